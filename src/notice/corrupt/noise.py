"""The Gaussian-noise baseline (ROME's causal tracing): noise on embeddings instead of a new input.

A noise pair carries `metadata["noise"] = {"stream": "vision" | "text", "positions": [..] | "all",
"scale": 3.0, "seed": int}`; its corrupt run is the clean input with
`scale * sigma * N(0, 1)` added to the embeddings at those positions (sigma: the adapter's
`embedding_sigma`). The same seed gives the same noise, so SMP/STR and noise are comparable
on the same samples.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

NOISE_SCALE = 3.0


def noise_spec(stream: str, positions: list[int] | str, seed: int, scale: float = NOISE_SCALE) -> dict[str, Any]:
    if stream not in ("vision", "text"):
        raise ValueError(f"noise stream must be 'vision' or 'text', not {stream!r}")
    return {"stream": stream, "positions": positions, "scale": float(scale), "seed": int(seed)}


def add_noise(embeddings: torch.Tensor, spec: dict[str, Any], sigma: float) -> torch.Tensor:
    """`embeddings` [B, N, D] with seeded Gaussian noise at the spec's positions (same noise per row)."""
    positions = (list(range(embeddings.shape[1])) if spec["positions"] == "all" else list(spec["positions"]))
    generator = torch.Generator().manual_seed(int(spec["seed"]))
    noise = torch.randn(len(positions), embeddings.shape[-1], generator=generator) * (spec["scale"] * sigma)
    out = embeddings.clone()
    out[:, positions] += noise.to(embeddings.device, embeddings.dtype)
    return out


# ------------------------------------------------------------- the corrupt run of a noise pair
# Everything below is the one place that turns a noise pair into its corrupt run; selection and
# the patching engine both call it, so both see the same noise.

def resolve_positions(adapter, pair) -> list[int]:
    """Embedding positions a noise pair corrupts: the spec's token positions (text), every patch
    ("all", [CLS] excluded) or the patches the clean object's mask touches ("object")."""
    spec = pair.metadata["noise"]
    positions = spec["positions"]
    if spec["stream"] == "text":  # stored on the question tokenized alone; the adapter maps them
        if positions == "all":
            positions = range(len(adapter.tokenizer(pair.clean_prompt)["input_ids"]))
        return adapter.prompt_positions(pair.clean_prompt, list(positions))
    if positions == "all":
        return list(range(1, adapter.num_patches + 1))  # vision embeddings: [CLS] + patches in both families
    if positions == "object":
        from notice.corrupt.image import load_mask

        mask = load_mask(pair.metadata["clean_mask"])
        if hasattr(adapter, "patch_positions"):  # families whose processor crops or pads say so themselves
            return list(adapter.patch_positions(mask))
        return mask_patch_positions(mask, adapter.num_patches)
    return list(positions)


def mask_patch_positions(mask: np.ndarray, num_patches: int, first_patch: int = 1) -> list[int]:
    """Token positions of the patches a mask touches, for a square patch grid over the whole
    resized image (BLIP's processor resizes without cropping); [CLS] precedes the patches."""
    grid = int(round(math.sqrt(num_patches)))
    height, width = mask.shape
    rows = np.minimum((np.arange(height) * grid) // height, grid - 1)
    cols = np.minimum((np.arange(width) * grid) // width, grid - 1)
    touched = np.zeros((grid, grid), dtype=bool)
    ys, xs = np.nonzero(mask > 0)
    touched[rows[ys], cols[xs]] = True
    return [first_patch + int(i) for i in np.flatnonzero(touched.reshape(-1))]


def noisy_embeddings(adapter, pair, embeddings: torch.Tensor) -> torch.Tensor:
    """A noise pair's corrupt embeddings [B, N, D] (B rows of this pair's clean input): image patch
    embeddings for stream "vision", question embeddings for stream "text"."""
    spec = pair.metadata["noise"]
    resolved = dict(spec, positions=resolve_positions(adapter, pair))
    with torch.no_grad():
        sigma = adapter.embedding_sigma(spec["stream"], embeddings)
    return add_noise(embeddings, resolved, sigma)


@torch.no_grad()
def noise_logits(adapter, pairs: Sequence, images: Sequence, batch_size: int = 32) -> torch.Tensor:
    """First answer-step logits [N, V] of the corrupt runs of noise pairs (images: their clean images)."""
    for pair in pairs:
        if pair.corruption not in ("image_noise", "text_noise"):
            raise ValueError(f"pair {pair.id} is not a noise pair ({pair.corruption})")
    out: list[torch.Tensor | None] = [None] * len(pairs)
    prompts = [p.clean_prompt for p in pairs]
    for index in adapter.batches_by_length(prompts, batch_size):
        inputs = adapter.prepare([images[i] for i in index], [prompts[i] for i in index])
        image_embeddings = adapter.embed_image(inputs.pixel_values)
        question_embeddings = adapter.embed_question(inputs.input_ids)
        for row, i in enumerate(index):
            pair = pairs[i]
            if pair.corruption == "image_noise":
                image_embeddings[row:row + 1] = noisy_embeddings(adapter, pair, image_embeddings[row:row + 1])
            else:
                question_embeddings[row:row + 1] = noisy_embeddings(adapter, pair, question_embeddings[row:row + 1])
        if hasattr(adapter, "logits_from_embeddings"):  # families without BLIP's encoder/decoder stages
            for i, logits in zip(index, adapter.logits_from_embeddings(inputs, image_embeddings, question_embeddings)):
                out[i] = logits
            continue
        image_states = adapter.encode_image(image_embeddings=image_embeddings)
        question_states = adapter.encode_question(None, inputs.attention_mask, image_states,
                                                  question_embeddings=question_embeddings)
        for i, logits in zip(index, adapter.decode(question_states, inputs.attention_mask)[:, 0].float()):
            out[i] = logits
    return torch.stack(out)  # type: ignore[arg-type]
