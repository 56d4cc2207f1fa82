"""The Gaussian-noise baseline (ROME's causal tracing): noise on embeddings instead of a new input.

A noise pair carries `metadata["noise"] = {"stream": "vision" | "text", "positions": [..] | "all",
"scale": 3.0, "seed": int}`; its corrupt run is the clean input with
`scale * sigma * N(0, 1)` added to the embeddings at those positions (sigma: the adapter's
`embedding_sigma`). The same seed gives the same noise, so SMP/STR and noise are comparable
on the same samples.
"""

from __future__ import annotations

from typing import Any

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
