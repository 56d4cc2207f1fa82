"""Head functions as tables: each measure reads what it should, and the step's files round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from notice.analysis import head_functions as hf


def _sample(pair_id: str = "p") -> hf.AttentionSample:
    """Two layers × two heads over a 2×2 grid whose first patch is the object and last patch an outlier:
    head (0, 0) looks only at the object, (0, 1) only at the outlier, layer 1 spreads evenly."""
    attention = np.full((2, 2, 4), 0.25)
    attention[0, 0] = [1, 0, 0, 0]
    attention[0, 1] = [0, 0, 0, 1]
    return hf.AttentionSample(pair_id, attention, np.array([1.0, 0, 0, 0]), np.array([False, False, False, True]),
                              (2, 2))


def test_measures_name_the_segmenting_and_the_outlier_head():
    table = hf.head_function_table([_sample()]).set_index(["layer", "head"])
    assert table.loc[(0, 0), "mask_mass"] == 1.0 and table.loc[(0, 0), "mask_iou"] == 1.0
    average_on_object = (1 + 0 + 0.25 + 0.25) / 4
    assert table.loc[(0, 0), "object_inhibition"] == pytest.approx(1 - average_on_object)
    assert table.loc[(0, 1), "object_inhibition"] == pytest.approx(-average_on_object)  # looks away from it
    assert table.loc[(0, 1), "outlier_inhibition"] > 0 > table.loc[(0, 0), "outlier_inhibition"]
    assert table.loc[(1, 0), "mask_iou"] in (0.0, 1.0)  # an even head's top patch is a tie, never between


def test_maps_are_the_heads_attention_minus_the_average_head():
    maps = hf.attention_maps([_sample("a"), _sample("b")], keep=1)
    assert set(maps["pair_id"]) == {"a"}
    grid = hf.relative_map(maps, "a", 0, 0)
    average = np.array([[1 + 0 + 0.25 + 0.25, 0.5], [0.5, 1.5]]) / 4
    np.testing.assert_allclose(grid, np.array([[1.0, 0], [0, 0]]) - average)


def test_the_step_writes_tables_the_report_reads_back(tiny_blip, tmp_path):
    import helpers
    from notice.pairs import Pair

    image = tmp_path / "red.png"
    helpers.shape_image(32, box=(8, 8, 24, 24)).save(image)
    pair = Pair("p", "color", "image_smp", str(image), str(image), "is the shape red or blue?",
                "is the shape red or blue?", "red", "blue")
    assert hf.read_head_functions(tmp_path / "hf") is None
    back = hf.read_head_functions(hf.write_head_functions(tiny_blip, [pair], tmp_path / "hf"))
    text = tiny_blip.streams["text"]
    assert len(back.table) == text.layers * text.heads and back.table["mask_iou"].isna().all()  # no mask given
    assert back.facts["stream"] == "text" and back.facts["component"] == "cross_attn" and back.facts["samples"] == 1
    assert hf.relative_map(back.maps, "p", 1, 2).shape == tuple(back.facts["grid"])
