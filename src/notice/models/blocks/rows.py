"""Gather, patch and scatter rows: the one place cells take a source's values into a receiving run; and
rows that enter a stack of layers at different depths, run as one batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:  # base.py imports the blocks
    from notice.models.base import PatchBatch


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


def run_entering_rows(entering: dict[int, torch.Tensor], layers: int,
                      step: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The output of a stack of `layers` layers for rows that enter it at different depths: entering[l] rows
    [n_l, Q, D] join the batch at the input of layer l (l = layers: after the last), `step(l, rows)` runs
    layer l. Rows come out grouped by entering layer, in order of l (`rows_in_given_order` undoes that)."""
    hidden = None
    for l in range(min(entering), layers + 1):
        if l in entering:
            hidden = entering[l] if hidden is None else torch.cat([hidden, entering[l]])
        if l < layers:
            assert hidden is not None, "the earliest entering layer comes first"
            hidden = step(l, hidden)
    assert hidden is not None, "rows enter before the last layer's output"
    return hidden


def rows_in_given_order(batches: Sequence[PatchBatch]) -> torch.Tensor | slice:
    """run_entering_rows returns rows grouped by entering layer (stable); this index puts them back."""
    layers = [b.layer for b in batches for _ in range(len(b))]
    if layers == sorted(layers):
        return slice(None)
    return torch.argsort(torch.argsort(torch.tensor(layers), stable=True))
