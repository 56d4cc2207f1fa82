"""Conditions are (task, modality, corruption): noise baselines never pool with SMP or STR, and
conditions without enough pairs are listed with the selection's reason."""

from __future__ import annotations

import pandas as pd

from notice.analysis.conditions import condition_labels, condition_table
from notice.analysis.universal import rank_by_condition
from results_fixtures import synthetic_table


def test_noise_and_smp_rows_of_one_task_and_modality_are_separate_conditions():
    table = synthetic_table({"color/image/image_smp": [(1, 1)], "color/image/image_noise": [(0, 2)]})
    assert set(condition_labels(table)) == {"color/image/smp", "color/image/noise"}
    rankings = rank_by_condition(table)
    top = {condition: (int(r.iloc[0]["layer"]), int(r.iloc[0]["head"])) for condition, r in rankings.items()}
    assert top == {"color/image/smp": (1, 1), "color/image/noise": (0, 2)}  # pooled, each would halve
    assert rankings["color/image/smp"].iloc[0]["mean_abs_effect"] > 0.7


def test_both_directions_in_one_table_split_every_condition():
    table = synthetic_table({"color/image": [(1, 1)]})
    both = pd.concat([table, table.assign(direction="noise")], ignore_index=True)
    assert set(condition_labels(both)) == {"color/image/smp/denoise", "color/image/smp/noise"}


def selection(kept: dict[str, int], dropped: dict[str, dict[str, int]], max_per_cell: int | None = 1) -> dict:
    """A selection report as `notice select` writes it (`<out>.selection.json`)."""
    return {"settings": {"max_per_cell": max_per_cell},
            "by_corruption": {c: {"input": kept[c] + sum(dropped[c].values()), "kept": kept[c], **dropped[c]}
                              for c in kept}}


def test_empty_and_thin_conditions_are_listed_with_the_selection_s_reason():
    table = synthetic_table({"color/image": [(1, 1)]}, samples=12)  # 12 pairs: below 20
    table = pd.concat([table, synthetic_table({"color/image/image_noise": [(1, 1)]}, samples=20)], ignore_index=True)
    report = selection({"image_smp": 12, "text_str": 0, "image_noise": 20},
                       {"image_smp": {"balance": 223, "clean_wrong": 5}, "text_str": {"no_flip": 239, "clean_wrong": 1},
                        "image_noise": {"balance": 220}})
    conditions = condition_table(table, {"color": report}).set_index("condition")
    assert list(conditions.index) == ["color/image/smp", "color/image/noise", "color/text/str"]  # baseline after SMP
    assert conditions.loc["color/image/noise", "status"] == "ok" and conditions.loc["color/image/noise", "reason"] == ""
    thin = conditions.loc["color/image/smp"]
    assert (thin["analysed"], thin["selected"], thin["status"]) == (12, 12, "too few pairs (< 20)")
    assert thin["reason"] == "12 of 240 kept; dropped: 223 balance (at most 1 per category and answer order), 5 clean_wrong"
    empty = conditions.loc["color/text/str"]
    assert (empty["analysed"], empty["patched"], empty["status"]) == (0, 0, "no pairs")
    assert empty["reason"] == "0 of 240 kept; dropped: 239 no_flip, 1 clean_wrong"


def test_without_selection_counts_a_thin_condition_says_where_to_find_them():
    table = synthetic_table({"color/image": [(1, 1)]}, samples=5)
    flagged = table.assign(flags=table["flags"].where(table["pair_id"] != "color-image-0", "tiny_ld_gap"))
    row = condition_table(flagged).iloc[0]
    assert (row["patched"], row["analysed"], row["status"]) == (5, 4, "too few pairs (< 20)")
    assert row["reason"].startswith("the effect is undefined for some pairs")
    assert condition_table(table, min_pairs=5).iloc[0]["status"] == "ok"
    assert "pass its selected pairs file (--pairs)" in condition_table(table).iloc[0]["reason"]
