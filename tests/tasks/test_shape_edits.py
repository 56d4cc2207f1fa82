"""SMP image edits: recolouring touches only the object's pixels; redrawing only the two shapes'."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import helpers
from notice.io import load_mask, save_mask
from notice.tasks.shape_edits import recolor, redraw, shape_alpha
from notice.tasks import easy_vqa
from notice.tasks.easy_vqa import PALETTE, object_alpha, pixel_color


def _easy_vqa_pictures(count: int = 6):
    paths = easy_vqa.image_paths("test")
    return [np.asarray(Image.open(paths[i]).convert("RGB")) for i in sorted(paths)[:count]]


@pytest.mark.parametrize("picture", range(6))
def test_recolour_keeps_every_pixel_outside_the_mask_bit_identical(picture):
    pixels = _easy_vqa_pictures()[picture]
    color = pixel_color(pixels)
    new = "blue" if color != "blue" else "yellow"
    out, alpha = recolor(pixels, color, new)
    outside = alpha == 0
    assert outside.any() and (~outside).any()
    np.testing.assert_array_equal(out[outside], pixels[outside])
    full = alpha >= 1
    assert (out[full] == PALETTE[new]).all()  # fully covered pixels take the new fill exactly
    assert pixel_color(out) == new
    # the edge blend is kept: the new image's coverage of the new colour is the old coverage
    np.testing.assert_allclose(object_alpha(out, new)[~outside], alpha[~outside], atol=0.02)


def test_recolour_on_a_drawn_shape_with_a_known_outline():
    pixels = np.asarray(helpers.shape_image(64, color=PALETTE["red"], shape="circle"))
    out, alpha = recolor(pixels, "red", "green")
    changed = np.any(out != pixels, axis=-1)
    assert changed.sum() == (alpha > 0).sum()


@pytest.mark.parametrize("picture", range(6))
def test_redrawn_shape_changes_only_pixels_of_the_old_or_new_shape(picture):
    pixels = _easy_vqa_pictures()[picture]
    color = pixel_color(pixels)
    for new_shape in ("circle", "rectangle", "triangle"):
        out, old, new = redraw(pixels, color, new_shape)
        untouched = (old == 0) & (new == 0)
        np.testing.assert_array_equal(out[untouched], pixels[untouched])
        assert (new > 0).sum() > 10
        np.testing.assert_allclose(object_alpha(out, color), new, atol=0.02)  # one shape only, the new one


def test_shapes_fill_their_box_as_expected():
    box = (8, 8, 40, 40)
    rect, circle, tri = (shape_alpha(s, box, (48, 48)) for s in ("rectangle", "circle", "triangle"))
    assert rect.sum() == pytest.approx(32 * 32, rel=0.01)
    assert circle.sum() == pytest.approx(np.pi * 16 ** 2, rel=0.02)
    assert tri.sum() == pytest.approx(32 * 32 / 2, rel=0.03)


def test_masks_round_trip_through_png(tmp_path):
    alpha = shape_alpha("circle", (4, 4, 20, 20), (24, 24))
    back = load_mask(save_mask(alpha, tmp_path / "m.png"))
    np.testing.assert_allclose(back, alpha, atol=1 / 255)
