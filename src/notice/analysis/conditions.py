"""Conditions: the groups that every heatmap, ranking and count averages within.

A condition is a task, the corrupted modality and the corruption (and the patching direction
where a table holds both), so that Gaussian-noise baselines, Semantic Minimal Pairs and both STR
forms are never pooled: their contrast is the point of the comparison. A condition the selection
asked for but that kept no pair, or too few to trust, is listed with the reason, read from the
selection's drop counts.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from notice.analysis.heads import valid_rows
from notice.pairs import modality_of

MIN_PAIRS = 20  # fewer pairs than this in a condition: its intervals are too wide to read much into

CORRUPTION_TITLES = {"image_smp": "Semantic Minimal Pairs", "text_str": "Symmetric Token Replacement",
                     "text_str_both": "Symmetric Token Replacement, both options",
                     "text_str_yesno": "Symmetric Token Replacement, yes/no form",
                     "image_noise": "Gaussian noise (baseline)", "text_noise": "Gaussian noise (baseline)"}

# why the selection drops a pair, by its filter name (notice.select.FILTERS)
FILTER_REASONS = {"duplicate": "the same pair twice", "prompt_too_long": "prompt longer than the model reads",
                  "answers_share_first_token": "both answers start with the same token",
                  "clean_wrong": "the model answers the clean input wrong",
                  "no_flip": "the corruption does not flip the model's answer",
                  "balance": "left out to balance categories and answer orders"}

KEYS = ["task", "modality", "corruption", "direction"]


def is_baseline(corruption: str) -> bool:
    """Gaussian noise is the baseline the noise-free corruptions are compared with."""
    return corruption.endswith("_noise")


def condition_label(task: str, modality: str, corruption: str, direction: str | None = None) -> str:
    """"task/modality/corruption[/direction]", the corruption without its modality prefix:
    easyvqa-color/image/smp, easyvqa-color/text/noise."""
    short = corruption[len(modality) + 1:] if corruption.startswith(modality + "_") else corruption
    return "/".join([task, modality, short] + ([direction] if direction else []))


def condition_labels(table: pd.DataFrame) -> pd.Series:
    """Each row's condition (`condition_label`); the direction joins the label only where the table
    holds both, since p(correct) and the effect read differently in the two."""
    with_direction = table["direction"].nunique() > 1
    # each key column factorized alone, then their code combinations: far cheaper than a MultiIndex of strings
    columns = [pd.factorize(table[key].astype(str)) for key in KEYS]
    combined = np.zeros(len(table), dtype=np.int64)
    for codes, uniques in columns:
        combined = combined * len(uniques) + codes
    combos, inverse = np.unique(combined, return_inverse=True)
    labels = []
    for combo in combos:
        parts: list[str] = []
        for _, uniques in reversed(columns):
            combo, code = divmod(combo, len(uniques))
            parts.insert(0, str(uniques[code]))
        task, modality, corruption, direction = parts
        labels.append(condition_label(task, modality, corruption, direction if with_direction else None))
    return pd.Series(np.array(labels, dtype=object)[inverse], index=table.index, dtype=object)


def condition_title(corruption: str) -> str:
    return CORRUPTION_TITLES.get(corruption, corruption)


def condition_order(conditions: pd.DataFrame) -> pd.DataFrame:
    """Conditions sorted as the report shows them: by task and modality, the noise-free corruption
    first and its Gaussian-noise baseline after it."""
    return conditions.assign(_baseline=conditions["corruption"].map(is_baseline)).sort_values(
        ["task", "modality", "_baseline", "corruption", "direction"]).drop(columns="_baseline").reset_index(drop=True)


def condition_table(table: pd.DataFrame, selections: Mapping[str, Mapping[str, Any]] | None = None,
                    min_pairs: int = MIN_PAIRS) -> pd.DataFrame:
    """One row per condition that the table holds or that a selection was asked for: pairs into the
    selection, kept, patched and analysed (pairs with a defined effect), a status ("ok", "too few
    pairs", "no pairs") and its reason from the drop counts.

    `selections`: task → a selection report as `notice select` writes it (`<out>.selection.json`)."""
    directions = sorted(table["direction"].astype(str).unique()) or ["denoise"]
    labels = condition_labels(table) if len(table) else pd.Series(dtype=object)
    patched = table.assign(condition=labels).groupby(["condition"] + KEYS, sort=False)["pair_id"].nunique()
    valid = valid_rows(table)
    analysed = valid.assign(condition=labels.loc[valid.index]).groupby("condition")["pair_id"].nunique()
    rows = {key[1:]: {"condition": key[0], **dict(zip(KEYS, key[1:])), "patched": int(count)}
            for key, count in patched.items()}
    for task, report in (selections or {}).items():
        for corruption, counts in report.get("by_corruption", {}).items():
            for direction in directions:
                key = (task, modality_of(corruption), corruption, direction)
                row = rows.setdefault(key, {"condition": condition_label(*key[:3], direction if len(directions) > 1
                                                                         else None),
                                            **dict(zip(KEYS, key)), "patched": 0})
                row.update(selected=int(counts.get("kept", 0)), input=int(counts.get("input", 0)),
                           reason=_drop_reason(counts, report.get("settings", {})))
    frame = pd.DataFrame(list(rows.values())).reindex(
        columns=["condition", *KEYS, "input", "selected", "patched", "analysed", "status", "reason"])
    frame["analysed"] = frame["condition"].map(analysed).fillna(0).astype(int)
    frame["status"] = np.select([frame["analysed"] == 0, frame["analysed"] < min_pairs],
                                ["no pairs", f"too few pairs (< {min_pairs})"], "ok")
    frame["reason"] = [_reason(row) for row in frame.itertuples()]
    return condition_order(frame)


def _reason(row: Any) -> str:
    if row.status == "ok":
        return ""
    if isinstance(row.reason, str):  # from the selection's counts
        return row.reason
    if row.patched > row.analysed:
        return "the effect is undefined for some pairs (clean and corrupt runs too close)"
    return "no selection counts for this task: pass its selected pairs file (--pairs) to see why"


def _drop_reason(counts: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """"16 of 240 kept; dropped: 223 balance (at most 1 per category and answer order), 1 clean_wrong";
    `FILTER_REASONS` says what each filter means."""
    drops = sorted(((int(counts.get(name, 0)), name) for name in FILTER_REASONS if counts.get(name)), reverse=True)
    parts = []
    for count, name in drops:
        cap = settings.get("max_per_cell") if name == "balance" else None
        parts.append(f"{count} {name}" + (f" (at most {cap} per category and answer order)" if cap else ""))
    kept = f"{int(counts.get('kept', 0))} of {int(counts.get('input', 0))} kept"
    return kept + ("; dropped: " + ", ".join(parts) if parts else "")
