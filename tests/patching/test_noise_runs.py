"""Noise pairs: seeded noise at the right embedding positions, and the very run selection measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from notice.corrupt.noise import noise_spec
from notice.io import save_mask
from notice.models.base import Run, add_noise, mask_patch_positions
from notice.pairs import Pair
from notice.patching.inputs import noisy_run, pair_noise, pair_runs


def _pair(tmp_path, stream: str, positions, seed: int = 5) -> Pair:
    image = tmp_path / "shape.png"
    helpers.shape_image(32, box=(0, 0, 15, 15), shape="rectangle").save(image)
    mask = np.zeros((32, 32))
    mask[:16, :16] = 1.0
    save_mask(mask, tmp_path / "mask.png")
    kind = "image_noise" if stream == "vision" else "text_noise"
    return Pair(id=f"s/{kind}", task="t", corruption=kind, clean_image=str(image), corrupt_image=str(image),
                clean_prompt="is the shape red or blue?", corrupt_prompt="is the shape red or blue?",
                correct="red", incorrect="blue",
                metadata={"noise": noise_spec(stream, positions, seed), "clean_mask": str(tmp_path / "mask.png")})


def test_mask_maps_to_the_patches_it_touches():
    mask = np.zeros((64, 64))
    mask[:32, :32] = 1
    assert mask_patch_positions(mask, (4, 4)) == [1, 2, 5, 6]  # [CLS] is position 0
    mask[:] = 0
    mask[63, 63] = 0.2
    assert mask_patch_positions(mask, (4, 4)) == [16]


def test_positions_all_object_and_tokens(tmp_path, tiny_blip):
    def resolved(stream, positions):
        pair = _pair(tmp_path, stream, positions)
        return pair_noise(tiny_blip, pair, pair_runs(tiny_blip, pair)[0])["positions"]

    assert resolved("vision", "all") == list(range(1, 17))
    assert resolved("vision", "object") == [1, 2, 5, 6]
    assert resolved("text", [4]) == [4]
    assert resolved("text", "all") == list(range(len(tiny_blip.tokenizer("is the shape red or blue?")["input_ids"])))


def test_noise_lands_only_at_its_positions_and_repeats_with_its_seed():
    clean = torch.randn(1, 9, 16)
    spec = dict(noise_spec("text", [4, 6], seed=5), positions=[4, 6])
    noisy = add_noise(clean, spec, sigma=1.0)
    assert (noisy != clean).any(dim=-1)[0].nonzero().flatten().tolist() == [4, 6]
    torch.testing.assert_close(noisy, add_noise(clean, spec, sigma=1.0))
    assert not torch.equal(noisy, add_noise(clean, dict(spec, seed=6), sigma=1.0))


def test_noise_spec_names_its_stream():
    with pytest.raises(ValueError, match="vision' or 'text"):
        noise_spec("audio", "all", seed=0)


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
    selected = tiny_blip.run_logits(noisy_run(tiny_blip, [pair], [image]))[0]
    _, corrupt = pair_runs(tiny_blip, pair)
    torch.testing.assert_close(tiny_blip.run_logits(corrupt)[0], selected, atol=1e-5, rtol=1e-5)
    clean = tiny_blip.run_logits(Run(tiny_blip.prepare([image], [question])))[0]
    assert (selected - clean).abs().max() > 1e-6  # the noise reached the run (a random tiny model reacts little)
