"""easy-VQA's Semantic Minimal Pairs, pixel by pixel: recolour a shape exactly, or redraw it.

An easy-VQA picture is a uniform background with one anti-aliased shape. Every pixel is a
blend `background * (1 - a) + fill * a` with coverage `a` (`object_alpha`), so a new
fill, or a new coverage from a different shape, gives an image that differs from the
original only where the object is. Masks are stored as 8-bit PNG (coverage * 255).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from notice.tasks.easy_vqa import PALETTE, SHAPES, _background_color, object_alpha

SUPERSAMPLE = 8  # sub-pixels per pixel side when drawing a shape's coverage


def composite(background: np.ndarray, fill: tuple[int, int, int], alpha: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] blend of a uniform background and a fill by per-pixel coverage."""
    blend = background[None, None, :] * (1.0 - alpha[..., None]) + np.array(fill, float)[None, None, :] * alpha[..., None]
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def recolor(pixels: np.ndarray, color: str, new_color: str) -> tuple[np.ndarray, np.ndarray]:
    """The same picture with the `color` shape refilled in `new_color`, and the shape's coverage.

    Pixels the shape does not cover are copied, so they stay bit-identical."""
    alpha = object_alpha(pixels, color)
    mask = alpha > 0
    out = pixels.copy()
    out[mask] = composite(_background_color(pixels), PALETTE[new_color], alpha)[mask]
    return out, alpha


def shape_alpha(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage [H, W] in [0, 1] of a filled shape inside the pixel box (x0, y0, x1, y1)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    height, width = size
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in box)
    if shape == "circle":  # a circle, not an ellipse, centred in the box
        radius = min(x1 - x0, y1 - y0) / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    hi = np.asarray(canvas, dtype=np.float64) / 255.0
    return hi.reshape(height, s, width, s).mean(axis=(1, 3))


def object_box(alpha: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """Pixel bounding box (x0, y0, x1, y1), end exclusive, of the mostly covered pixels."""
    ys, xs = np.nonzero(alpha >= threshold)
    if len(xs) == 0:
        ys, xs = np.nonzero(alpha > 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def redraw(pixels: np.ndarray, color: str, new_shape: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same picture with its `color` shape replaced by `new_shape` in the same box and colour.

    Returns the new pixels and the old and new coverages; pixels that neither shape covers are
    copied unchanged."""
    old_alpha = object_alpha(pixels, color)
    background = _background_color(pixels)
    new_alpha = shape_alpha(new_shape, object_box(old_alpha), pixels.shape[:2])
    out = pixels.copy()
    touched = (old_alpha > 0) | (new_alpha > 0)
    out[touched] = composite(background, PALETTE[color], new_alpha)[touched]
    return out, old_alpha, new_alpha

