"""Noise pairs: the patching engine's corrupt run is the very run selection measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from notice.corrupt.noise import noise_logits, noise_spec
from notice.pairs import Pair
from notice.patching.inputs import pair_runs


@pytest.mark.parametrize("stream, positions", [("vision", "all"), ("vision", "object"), ("text", [4]),
                                                ("text", "all")])
def test_engine_corrupt_run_equals_selection_noise_run(tiny_blip, tmp_path, stream, positions):
    image = helpers.shape_image(32, box=(8, 8, 24, 24))
    image_path, mask_path = tmp_path / "image.png", tmp_path / "mask.png"
    image.save(image_path)
    Image.fromarray((np.asarray(image)[..., 1] < 100).astype(np.uint8) * 255).save(mask_path)
    question = "is the shape red or blue?"
    pair = Pair("p", "t", f"{'image' if stream == 'vision' else 'text'}_noise", str(image_path), str(image_path),
                question, question, "red", "blue",
                {"noise": noise_spec(stream, positions, seed=5), "clean_mask": str(mask_path)})
    selected = noise_logits(tiny_blip, [pair], [image])[0]
    _, corrupt = pair_runs(tiny_blip, pair)
    torch.testing.assert_close(tiny_blip.run_logits(corrupt)[0], selected, atol=1e-5, rtol=1e-5)
    clean = tiny_blip.answer_logits([image], [question])[0]
    assert (selected - clean).abs().max() > 1e-6  # the noise reached the run (a random tiny model reacts little)
