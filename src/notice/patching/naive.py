"""Activation patching the plain way: one full forward of the receiving run per cell, with a hook
on the model's own module that overwrites the site's activation. Slow and obviously right: the
reference every fast path in engine.py is tested against."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from notice.models.base import ModelAdapter, Run
from notice.pairs import Pair
from notice.patching.inputs import check_direction, pair_baseline, pair_runs
from notice.patching.metrics import cell_stats, pair_table
from notice.patching.sites import ALL, Site, expand_sites


def _rows(site: Site) -> slice:
    return slice(None) if site.position == ALL else slice(int(site.position), int(site.position) + 1)


@contextmanager
def hooked(adapter: ModelAdapter, site: Site, edit, run: Run) -> Iterator[None]:
    """Run `edit(tensor [B, P, W]) -> tensor` on the site's activation during forwards of `run` (or of
    inputs shaped like it) in this block."""
    handles = adapter.edit_site(site, edit, run)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def record(adapter: ModelAdapter, run: Run, sites: Sequence[Site], logits: list | None = None) -> dict[str, torch.Tensor]:
    """Every site's whole activation [P, W] in one plain forward of `run`, keyed by site.module (and the
    forward's logits [V] appended to `logits` when given)."""
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name, site in {s.module: s for s in sites}.items():
            def keep(t: torch.Tensor, name: str = name) -> torch.Tensor:
                out[name] = t[0].clone()
                return t
            stack.enter_context(hooked(adapter, site, keep, run))
        answer = adapter.run_logits(run)[0]
    if logits is not None:
        logits.append(answer)
    return out


@torch.no_grad()
def patched_logits(adapter: ModelAdapter, receiving: Run, site: Site, value: torch.Tensor) -> torch.Tensor:
    """Logits [1, V] of the receiving run with the site overwritten from `value` [P, W]."""
    rows, columns = _rows(site), adapter.site_columns(site) or slice(None)

    def patch(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, rows, columns] = value[rows, columns]
        return t

    with hooked(adapter, site, patch, receiving):
        return adapter.run_logits(receiving)


@torch.no_grad()
def naive_patch_pair(adapter: ModelAdapter, pair: Pair, sites: Sequence[str], direction: str = "denoise",
                     model_name: str = "") -> pd.DataFrame:
    """The results table of one pair, one full forward per cell."""
    check_direction(direction)
    clean, corrupt = pair_runs(adapter, pair)
    receiving, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    cells = expand_sites(sites, adapter.streams, adapter.num_positions(clean))
    base = pair_baseline(adapter, pair, adapter.run_logits(clean)[0], adapter.run_logits(corrupt)[0])
    values = record(adapter, source, cells)
    stats = torch.cat([cell_stats(patched_logits(adapter, receiving, site, values[site.module]), base)
                       for site in cells]).cpu().numpy() if cells else np.zeros((0, 3))
    return pair_table(pair, direction, cells, stats, base, adapter.position_labels(clean),
                      adapter.position_labels(corrupt), model_name or adapter.name)
