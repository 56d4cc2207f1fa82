"""Head rankings and universal heads are computed from the table: planted heads are found."""

from __future__ import annotations

import numpy as np
import pytest

from notice.analysis.heads import head_effects, head_heatmap, module_heatmap, rank_heads
from notice.analysis.universal import rank_by_condition, universal_heads
from results_fixtures import synthetic_table


def test_module_heatmap_averages_over_samples_per_layer_and_position():
    table = synthetic_table({"color/image": []})
    views = module_heatmap(table, "text", "layer")
    assert views["mean"].shape == (3, 5)
    assert views["count"].to_numpy().min() == 12
    assert views["mean"].loc[2, 2] == pytest.approx(0.3, abs=0.02)
    assert abs(views["mean"].loc[2, 0]) < 0.02


def test_planted_heads_rank_first_and_are_important():
    table = synthetic_table({"color/image": [(1, 2), (2, 0)]})
    ranked = rank_heads(head_effects(table), seed=0)
    assert {(r.layer, r.head) for r in ranked.head(2).itertuples()} == {(1, 2), (2, 0)}
    single = rank_heads(head_effects(synthetic_table({"color/image": [(1, 2)]})), seed=0)
    assert [(r.layer, r.head) for r in single[single["important"]].itertuples()] == [(1, 2)]
    top = ranked.iloc[0]
    assert top.ci_low <= top.mean_abs_effect <= top.ci_high
    assert head_heatmap(head_effects(table))["mean"].loc[1, 2] == pytest.approx(0.8, abs=0.05)


def test_flagged_and_nan_rows_are_left_out():
    table = synthetic_table({"color/image": [(0, 0)]})
    table.loc[table["pair_id"] == "color-image-0", "flags"] = "small_gap"
    table.loc[table.index[:10], "normalized_effect"] = np.nan
    effects = head_effects(table)
    assert "color-image-0" not in set(effects["pair_id"])
    assert np.isfinite(effects["normalized_effect"]).all()


def test_universal_heads_are_those_important_everywhere():
    table = synthetic_table({"color/image": [(1, 1), (2, 3)], "color/text": [(1, 1)],
                             "shape/image": [(1, 1), (0, 2)], "shape/text": [(1, 1), (2, 3)]})
    rankings = rank_by_condition(table)
    assert set(rankings) == {"color/image", "color/text", "shape/image", "shape/text"}
    everywhere = universal_heads(rankings)
    assert list(everywhere["head"]) == ["L1H1"]
    three = universal_heads(rankings, min_conditions=2)
    assert set(three["head"]) == {"L1H1", "L2H3"}
    with pytest.raises(ValueError):
        universal_heads(rankings, min_conditions=5)
