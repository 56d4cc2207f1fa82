"""Universal heads: heads important in at least k of the n conditions.

Computed from the results table, never written by hand. The paper's "universal" means all
conditions, the default here. A condition is a task, the corrupted modality and the corruption
(`notice.analysis.conditions`), so that no ranking pools Gaussian noise with Semantic Minimal
Pairs, or the two STR forms.
"""

from __future__ import annotations

import pandas as pd

from notice.analysis.conditions import condition_labels
from notice.analysis.heads import METRIC, head_effects, head_name, rank_heads

COLUMNS = ["head", "layer", "head_index", "conditions", "of", "where"]


def rank_by_condition(table: pd.DataFrame, stream: str = "text", component: str = "cross_attn",
                      metric: str = METRIC, sigmas: float = 2.0, top_k: int = 10, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Ranked heads per condition (see `condition_labels`)."""
    return {name: rank_heads(effects, metric, sigmas=sigmas, top_k=top_k, seed=seed)
            for name, effects in _condition_effects(table, stream, component, metric)}


def condition_names(table: pd.DataFrame, stream: str = "text", component: str = "cross_attn",
                    metric: str = METRIC) -> list[str]:
    """The conditions that `rank_by_condition` ranks (those with head effects), without ranking them."""
    return [name for name, _ in _condition_effects(table, stream, component, metric)]


def _condition_effects(table: pd.DataFrame, stream: str, component: str, metric: str):
    for condition, rows in table.groupby(condition_labels(table), sort=True):
        effects = head_effects(rows, stream, component, metric)
        if not effects.empty:
            yield str(condition), effects


def universal_heads(rankings: dict[str, pd.DataFrame], min_conditions: int | None = None,
                    rule: str = "important") -> pd.DataFrame:
    """Heads marked by `rule` ("important": mean + 2σ, or "top_k") in at least `min_conditions`
    conditions (default: all of them), with the conditions that name them."""
    n = len(rankings)
    if not n:
        return pd.DataFrame(columns=COLUMNS)
    k = n if min_conditions is None else min_conditions
    if not 1 <= k <= max(n, 1):
        raise ValueError(f"min_conditions must be between 1 and {n}, not {k}")
    hits: dict[tuple[int, int], list[str]] = {}
    for condition, ranked in rankings.items():
        for row in ranked[ranked[rule]].itertuples():
            hits.setdefault((int(row.layer), int(row.head)), []).append(condition)
    rows = [{"head": head_name(*key), "layer": key[0], "head_index": key[1], "conditions": len(names),
             "of": n, "where": ", ".join(sorted(names))}
            for key, names in hits.items() if len(names) >= k]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["conditions", "layer", "head_index"], ascending=[False, True, True], ignore_index=True)
