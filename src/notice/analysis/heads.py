"""Views of the results table: heatmaps over layers and positions, and ranked heads.

The table is long (one row per sample, direction and site; see `notice.store`). Every view
here is a groupby over it; nothing is recomputed from the model.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

METRIC = "normalized_effect"  # 0 = the receiving run's behaviour, 1 = the source run's
ALL_POSITIONS = -1  # module_means' position of a patch at every position at once


def valid_rows(table: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Rows with a defined metric from pairs without flags (e.g. clean and corrupt too close to normalize)."""
    rows = table[np.isfinite(table[metric].astype(float))]
    if "flags" in rows:
        rows = rows[rows["flags"].fillna("") == ""]
    return rows


def one_method(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of one patching method: a table of attribution estimates whose top cells were also
    patched exactly (`method` "exact") is read as the estimates, which cover every cell; the exact rows
    would otherwise be averaged with the estimates of the same cells."""
    if "method" not in table or table["method"].nunique() < 2:
        return table
    return table[table["method"] != "exact"]


def patching_methods(table: pd.DataFrame) -> list[str]:
    """How a table's effects were obtained: "exact" (one patched run per cell) where it says nothing."""
    return sorted(table["method"].astype(str).unique()) if "method" in table and len(table) else ["exact"]


def head_effects(table: pd.DataFrame, stream: str = "text", component: str = "cross_attn",
                 metric: str = METRIC) -> pd.DataFrame:
    """One value per (sample, layer, head): the head patched at all positions where that was run,
    else its signed effect at the position where it is largest in magnitude."""
    rows = valid_rows(table, metric)
    rows = rows[(rows["stream"] == stream) & (rows["component"] == component) & rows["head"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["pair_id", "layer", "head", metric])
    keys = ["pair_id", "direction", "layer", "head"]
    whole = rows[rows["position"].isna()]
    if not whole.empty:
        return whole[keys + [metric]].reset_index(drop=True)
    rows = rows.reset_index(drop=True)
    strongest = rows.loc[rows[metric].abs().groupby([rows[k] for k in keys]).idxmax()]
    return strongest[keys + [metric]].reset_index(drop=True)


def bootstrap_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over samples (rows) of `values` [samples, cells],
    NaN where a cell was not measured."""
    rng = np.random.default_rng(seed)
    samples, cells = values.shape
    resamples = np.stack([rng.integers(0, samples, samples) for _ in range(n_boot)])  # [n_boot, samples]
    measured = np.isfinite(values)
    filled = np.where(measured, values, 0.0)
    boot = np.empty((n_boot, cells))
    # nanmean of each resample, many resamples at once (sums in the same order, so the same numbers);
    # chunks keep the [resamples, samples, cells] gather near 16 MB
    chunk = max(1, 2_000_000 // max(samples * cells, 1))
    with warnings.catch_warnings():  # a cell no resample measured has no mean: NaN, as wanted
        warnings.simplefilter("ignore", RuntimeWarning)
        for start in range(0, n_boot, chunk):
            rows = resamples[start:start + chunk]
            boot[start:start + chunk] = filled[rows].sum(axis=1) / measured[rows].sum(axis=1)
        tail = 50 * (1 - level)
        return _nanpercentile(boot, tail), _nanpercentile(boot, 100 - tail)


def _nanpercentile(boot: np.ndarray, q: float) -> np.ndarray:
    """np.nanpercentile over axis 0; columns without NaN take the fast path (the same numbers)."""
    whole = ~np.isnan(boot).any(axis=0)
    out = np.empty(boot.shape[1])
    out[whole] = np.percentile(boot[:, whole], q, axis=0)
    if not whole.all():
        out[~whole] = np.nanpercentile(boot[:, ~whole], q, axis=0)
    return out


def rank_heads(effects: pd.DataFrame, metric: str = METRIC, sigmas: float = 2.0, top_k: int = 10,
               n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Heads ranked by mean |effect| over samples, with a bootstrap 95% interval per head.

    `important` is the paper's rule: mean |effect| above the mean over heads plus `sigmas`
    standard deviations; `top_k` marks the k strongest as well, so small sweeps still rank.
    """
    table = effects.assign(magnitude=effects[metric].abs())
    pivot = table.pivot_table(index="pair_id", columns=["layer", "head"], values="magnitude", aggfunc="mean")
    values = pivot.to_numpy(dtype=float)  # [samples, heads], NaN where a head was not measured
    low, high = bootstrap_interval(values, n_boot, seed)
    mean_abs = np.nanmean(values, axis=0)
    signed = table.groupby(["layer", "head"])[metric].mean().reindex(pivot.columns).to_numpy()
    threshold = float(np.nanmean(mean_abs) + sigmas * np.nanstd(mean_abs))
    ranked = pd.DataFrame({
        "layer": [c[0] for c in pivot.columns], "head": [c[1] for c in pivot.columns],
        "mean_abs_effect": mean_abs, "mean_effect": signed, "ci_low": low, "ci_high": high,
        "samples": np.sum(np.isfinite(values), axis=0),
    }).sort_values("mean_abs_effect", ascending=False, ignore_index=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["important"] = ranked["mean_abs_effect"] > threshold
    ranked["top_k"] = ranked["rank"] <= top_k
    ranked.attrs["threshold"] = threshold
    return ranked


def module_means(table: pd.DataFrame, stream: str, metric: str = METRIC, n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """Whole-module patches of `stream` (no heads): per (component, layer, position) the mean effect
    over samples with a bootstrap 95% interval, spread, count and the position's token label. A module
    patched at every position at once (`@all`) is position -1, labelled "all positions"."""
    rows = valid_rows(table, metric)
    rows = rows[(rows["stream"] == stream) & rows["head"].isna()]
    rows = rows.assign(position=rows["position"].fillna(ALL_POSITIONS).astype(int))
    columns = ["component", "layer", "position", "token", "mean", "ci_low", "ci_high", "std", "count"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    pivot = rows.pivot_table(index="pair_id", columns=["component", "layer", "position"], values=metric,
                             aggfunc="mean")
    values = pivot.to_numpy(dtype=float)  # [samples, cells]
    low, high = bootstrap_interval(values, n_boot, seed)
    cells = pd.DataFrame(list(pivot.columns), columns=["component", "layer", "position"])
    positions = sorted(rows["position"].unique())
    labels = dict(zip(positions, position_labels(rows, positions)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = cells.assign(token=cells["position"].map(labels), mean=np.nanmean(values, axis=0), ci_low=low,
                             ci_high=high, std=np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.nan,
                             count=np.sum(np.isfinite(values), axis=0))
    return means[columns]


def position_labels(table: pd.DataFrame, positions: Sequence[int]) -> list[str]:
    """Label each position by its token; where samples differ (the options), show the variants."""
    labels = []
    for position in positions:
        if position == ALL_POSITIONS:
            labels.append("all positions")
            continue
        tokens = table.loc[table["position"] == position, "token"].dropna().astype(str)
        variants = list(dict.fromkeys(tokens))
        if len(variants) == 1:
            labels.append(variants[0])
        elif variants:
            labels.append(f"{position}:{'/'.join(variants[:2])}{'…' if len(variants) > 2 else ''}")
        else:
            labels.append(str(position))
    return labels


def strongest_cell(means: pd.DataFrame, skip: Sequence[str] = ("layer",)) -> pd.Series | None:
    """The module cell with the largest |mean effect|, among components other than `skip` (the layer
    output carries everything downstream; the modules say where it is computed) where there are any."""
    if means.empty:
        return None
    modules = means[~means["component"].isin(skip)]
    chosen = modules if not modules.empty and modules["mean"].notna().any() else means
    return chosen.loc[chosen["mean"].abs().idxmax()] if chosen["mean"].notna().any() else None


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"
