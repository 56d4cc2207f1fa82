"""What every model adapter tells the rest of the code, so nothing else hard-codes shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class StreamFacts:
    """One transformer stack of a model (BLIP: vision, text encoder, answer decoder)."""

    name: str
    layers: int
    heads: int
    head_dim: int
    hidden: int
    components: tuple[str, ...]  # patchable parts of a layer, e.g. ("layer", "self_attn", "mlp")
    positions: str  # what a position indexes: "patch", "token" or "answer"
    description: str


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from notice.errors import NoticeError

    if dtype not in DTYPES:
        raise NoticeError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]
