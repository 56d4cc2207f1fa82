"""The Gaussian-noise baseline's corrupt run: seeded, at the right positions, shared by all callers."""

from __future__ import annotations

import numpy as np
import torch

import helpers
from notice.corrupt.image import save_mask
from notice.corrupt.noise import mask_patch_positions, noise_logits, noise_spec, noisy_embeddings, resolve_positions
from notice.pairs import Pair


def _pair(tmp_path, stream: str, positions, scale: float = 3.0, seed: int = 5) -> Pair:
    image = tmp_path / "shape.png"
    helpers.shape_image(32, box=(0, 0, 15, 15), shape="rectangle").save(image)
    mask = np.zeros((32, 32))
    mask[:16, :16] = 1.0
    save_mask(mask, tmp_path / "mask.png")
    kind = "image_noise" if stream == "vision" else "text_noise"
    return Pair(id=f"s/{kind}", task="t", corruption=kind, clean_image=str(image), corrupt_image=str(image),
                clean_prompt="is the shape red or blue?", corrupt_prompt="is the shape red or blue?",
                correct="red", incorrect="blue",
                metadata={"noise": noise_spec(stream, positions, seed, scale), "clean_mask": str(tmp_path / "mask.png")})


def test_mask_maps_to_the_patches_it_touches():
    mask = np.zeros((64, 64))
    mask[:32, :32] = 1
    assert mask_patch_positions(mask, 16) == [1, 2, 5, 6]  # [CLS] is position 0
    mask[:] = 0
    mask[63, 63] = 0.2
    assert mask_patch_positions(mask, 16) == [16]


def test_positions_all_object_and_tokens(tmp_path, tiny_blip):
    assert resolve_positions(tiny_blip, _pair(tmp_path, "vision", "all")) == list(range(1, 17))
    assert resolve_positions(tiny_blip, _pair(tmp_path, "vision", "object")) == [1, 2, 5, 6]
    assert resolve_positions(tiny_blip, _pair(tmp_path, "text", [4])) == [4]


def test_noise_lands_only_at_its_positions_and_repeats_with_its_seed(tmp_path, tiny_blip):
    pair = _pair(tmp_path, "text", [4, 6])
    ids = torch.tensor([tiny_blip.tokenizer(pair.clean_prompt)["input_ids"]])
    clean = tiny_blip.embed_question(ids)
    noisy = noisy_embeddings(tiny_blip, pair, clean)
    changed = (noisy != clean).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [4, 6]
    torch.testing.assert_close(noisy, noisy_embeddings(tiny_blip, pair, clean))
    other = _pair(tmp_path, "text", [4, 6], seed=6)
    assert not torch.equal(noisy, noisy_embeddings(tiny_blip, other, clean))


def test_zero_noise_gives_the_clean_logits_and_real_noise_moves_them(tmp_path, tiny_blip):
    from notice.io import load_image

    for stream, positions in (("vision", "object"), ("text", [4])):
        silent = _pair(tmp_path, stream, positions, scale=0.0)
        image = load_image(silent.clean_image)
        clean = tiny_blip.answer_logits([image], [silent.clean_prompt])
        silent_change = (noise_logits(tiny_blip, [silent], [image]) - clean).abs().max().item()
        loud = _pair(tmp_path, stream, positions, scale=3.0)
        first = noise_logits(tiny_blip, [loud], [image])
        # a random tiny model barely reacts to its input, but far more than float round-off does
        assert silent_change < 1e-6 < 1e-5 < (first - clean).abs().max().item()
        torch.testing.assert_close(noise_logits(tiny_blip, [loud, loud], [image, image])[1:], first)
