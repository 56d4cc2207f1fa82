"""Head rankings and universal heads are computed from the table: planted heads are found."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from notice.analysis.heads import bootstrap_interval, head_effects, module_means, rank_heads, strongest_cell
from notice.analysis.universal import rank_by_condition, universal_heads
from results_fixtures import synthetic_table


def test_module_means_average_over_samples_per_layer_and_position_with_intervals():
    table = synthetic_table({"color/image": []})
    means = module_means(table, "text").set_index(["component", "layer", "position"])
    assert len(means) == 3 * 3 * 5 and set(means.index.get_level_values("component")) == {"layer", "mlp", "cross_attn"}
    assert (means["count"] == 12).all() and (means["token"].loc["layer", 0] == [f"t{p}" for p in range(5)]).all()
    assert means.loc[("layer", 2, 2), "mean"] == pytest.approx(0.3, abs=0.02)
    assert abs(means.loc[("layer", 2, 0), "mean"]) < 0.02
    assert ((means["ci_low"] <= means["mean"]) & (means["mean"] <= means["ci_high"])).all()
    assert (means["ci_high"] - means["ci_low"]).max() < 0.05  # noise of 0.01 over 12 samples
    strongest = strongest_cell(module_means(table, "text"))
    assert (strongest["component"], strongest["layer"], strongest["position"]) in {("mlp", 2, 2), ("cross_attn", 2, 2)}


def test_a_module_patched_at_every_position_at_once_is_its_own_column():
    table = synthetic_table({"color/image": []})
    table = table[(table["component"] != "mlp") | (table["position"] == 2)]
    table.loc[table["component"] == "mlp", "position"] = pd.NA  # as `text.*.mlp@all` writes it
    means = module_means(table, "text")
    mlp = means[means["component"] == "mlp"]
    assert list(mlp["position"]) == [-1] * 3 and set(mlp["token"]) == {"all positions"} and (mlp["count"] == 12).all()
    assert mlp.set_index("layer").loc[2, "mean"] == pytest.approx(0.3, abs=0.02)


def test_bootstrap_interval_narrows_with_more_samples_and_skips_unmeasured_cells():
    rng = np.random.default_rng(0)
    few, many = rng.normal(1.0, 1.0, (10, 1)), rng.normal(1.0, 1.0, (1000, 1))
    (low_few, high_few), (low_many, high_many) = bootstrap_interval(few), bootstrap_interval(many)
    assert high_many - low_many < (high_few - low_few) / 3 and low_many < 1.0 < high_many
    low, high = bootstrap_interval(np.array([[1.0, np.nan], [2.0, np.nan]]))
    assert 1.0 <= low[0] <= high[0] <= 2.0 and np.isnan(low[1]) and np.isnan(high[1])


def test_planted_heads_rank_first_and_are_important():
    table = synthetic_table({"color/image": [(1, 2), (2, 0)]})
    ranked = rank_heads(head_effects(table), seed=0)
    assert {(r.layer, r.head) for r in ranked.head(2).itertuples()} == {(1, 2), (2, 0)}
    single = rank_heads(head_effects(synthetic_table({"color/image": [(1, 2)]})), seed=0)
    assert [(r.layer, r.head) for r in single[single["important"]].itertuples()] == [(1, 2)]
    top = ranked.iloc[0]
    assert top.ci_low <= top.mean_abs_effect <= top.ci_high
    assert top.mean_abs_effect == pytest.approx(0.8, abs=0.05)


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
    assert set(rankings) == {"color/image/smp", "color/text/str", "shape/image/smp", "shape/text/str"}
    everywhere = universal_heads(rankings)
    assert list(everywhere["head"]) == ["L1H1"]
    three = universal_heads(rankings, min_conditions=2)
    assert set(three["head"]) == {"L1H1", "L2H3"}
    with pytest.raises(ValueError):
        universal_heads(rankings, min_conditions=5)
