"""Gather, patch and scatter rows: the one place cells take a source's values into a receiving run."""

from __future__ import annotations

import torch


def patched_value(source: torch.Tensor, receiving: torch.Tensor, index: torch.Tensor,
                  columns: torch.Tensor | None) -> torch.Tensor:
    """The patched values at rows index [N, K] of [P, W] activations: the source's, only in `columns`
    [N, W] (a head's slice) where given, the receiving run's elsewhere → [N, K, W]."""
    value = source[index]
    if columns is not None:
        value = torch.where(columns[:, None, :], value, receiving[index])
    return value


def scatter_rows(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """N copies of base [P, W] with rows index [N, K] replaced by rows [N, K, W] → [N, P, W]."""
    out = base.expand(index.shape[0], -1, -1).clone()
    return out.scatter_(1, index[..., None].expand(-1, -1, out.shape[-1]), rows.to(out.dtype))
