"""Views of the results table: heatmaps over layers and positions, and ranked heads.

The table is long (one row per sample, direction and site; see `notice.store`). Every view
here is a groupby over it; nothing is recomputed from the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRIC = "normalized_effect"  # 0 = the receiving run's behaviour, 1 = the source run's


def _valid(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows with a defined metric from pairs without flags (e.g. clean and corrupt too close to normalize)."""
    rows = table[np.isfinite(table[metric].astype(float))]
    if "flags" in rows:
        rows = rows[rows["flags"].fillna("") == ""]
    return rows


def module_heatmap(table: pd.DataFrame, stream: str, component: str, metric: str = METRIC) -> dict[str, pd.DataFrame]:
    """Layer × position means of `metric` for whole-module patches, with counts and spread."""
    rows = _valid(table, metric)
    rows = rows[(rows["stream"] == stream) & (rows["component"] == component) & rows["head"].isna()
                & rows["position"].notna()].astype({"position": int})
    grouped = rows.groupby(["layer", "position"])[metric]
    return {name: getattr(grouped, name)().unstack("position").sort_index() for name in ("mean", "std", "count")}


def head_effects(table: pd.DataFrame, stream: str = "text", component: str = "cross_attn",
                 metric: str = METRIC) -> pd.DataFrame:
    """One value per (sample, layer, head): the head patched at all positions where that was run,
    else its signed effect at the position where it is largest in magnitude."""
    rows = _valid(table, metric)
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


def head_heatmap(effects: pd.DataFrame, metric: str = METRIC) -> dict[str, pd.DataFrame]:
    """Layer × head mean effect over samples, with counts and spread."""
    effects = effects.astype({"layer": int, "head": int})
    grouped = effects.groupby(["layer", "head"])[metric]
    return {name: getattr(grouped, name)().unstack("head").sort_index() for name in ("mean", "std", "count")}


def rank_heads(effects: pd.DataFrame, metric: str = METRIC, sigmas: float = 2.0, top_k: int = 10,
               n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Heads ranked by mean |effect| over samples, with a bootstrap 95% interval per head.

    `important` is the paper's rule: mean |effect| above the mean over heads plus `sigmas`
    standard deviations; `top_k` marks the k strongest as well, so small sweeps still rank.
    """
    table = effects.assign(magnitude=effects[metric].abs())
    pivot = table.pivot_table(index="pair_id", columns=["layer", "head"], values="magnitude", aggfunc="mean")
    values = pivot.to_numpy(dtype=float)  # [samples, heads], NaN where a head was not measured
    rng = np.random.default_rng(seed)
    samples = values.shape[0]
    boot = np.empty((n_boot, values.shape[1]))
    for b in range(n_boot):
        boot[b] = np.nanmean(values[rng.integers(0, samples, samples)], axis=0)
    mean_abs = np.nanmean(values, axis=0)
    signed = table.groupby(["layer", "head"])[metric].mean().reindex(pivot.columns).to_numpy()
    threshold = float(np.nanmean(mean_abs) + sigmas * np.nanstd(mean_abs))
    ranked = pd.DataFrame({
        "layer": [c[0] for c in pivot.columns], "head": [c[1] for c in pivot.columns],
        "mean_abs_effect": mean_abs, "mean_effect": signed,
        "ci_low": np.nanpercentile(boot, 2.5, axis=0), "ci_high": np.nanpercentile(boot, 97.5, axis=0),
        "samples": np.sum(np.isfinite(values), axis=0),
    }).sort_values("mean_abs_effect", ascending=False, ignore_index=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["important"] = ranked["mean_abs_effect"] > threshold
    ranked["top_k"] = ranked["rank"] <= top_k
    ranked.attrs["threshold"] = threshold
    return ranked


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"
