"""The Gaussian-noise baseline (ROME's causal tracing): noise on embeddings instead of a new input.

A noise pair carries `metadata["noise"] = {"stream": "vision" | "text", "positions": [..] | "all" |
"object", "scale": 3.0, "seed": int}`: text positions index the question tokenized alone, image
positions "all" patches or the "object" under the clean mask. The model adapter resolves them to
its own embedding positions (`ModelAdapter.resolve_noise`) and adds `scale * sigma * N(0, 1)` there,
seeded, so SMP/STR and noise are comparable on the same samples.
"""

from __future__ import annotations

from typing import Any

NOISE_SCALE = 3.0


def noise_spec(stream: str, positions: list[int] | str, seed: int, scale: float = NOISE_SCALE) -> dict[str, Any]:
    if stream not in ("vision", "text"):
        raise ValueError(f"noise stream must be 'vision' or 'text', not {stream!r}")
    return {"stream": stream, "positions": positions, "scale": float(scale), "seed": int(seed)}
