"""Sweeps over many pairs: per-pair shards, resume after a kill, the loaders, the CLI verb."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import helpers
from notice.cli import app
from notice.errors import NoticeError
from notice.models.blip import BlipAdapter
from notice.pairs import Pair, write_pairs
from notice.patching.engine import patch_pairs
from notice.patching.metrics import COLUMNS
from notice.store import load_results, results_xarray

SITES = ["text.*.cross_attn.head*", "text.*.mlp@all"]


@pytest.fixture(scope="module")
def tiny():
    arch = helpers.TINY_BLIP
    return BlipAdapter(helpers.sensitize(helpers.blip_model(arch)), helpers.blip_processor(arch["image_size"]), "tiny")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
    for name, rgb in colors.items():
        helpers.shape_image(32, rgb, box=(8, 8, 24, 24)).save(folder / f"{name}.png")
    out = []
    for i, (a, b) in enumerate([("red", "blue"), ("blue", "green"), ("green", "red")]):
        out.append(Pair(f"smp/{i}", "colors", "image_smp", str(folder / f"{a}.png"), str(folder / f"{b}.png"),
                        "what color is the shape?", "what color is the shape?", a, b))
    out.append(Pair("str/0", "colors", "text_str", str(folder / "red.png"), str(folder / "red.png"),
                    "is the shape red?", "is the shape blue?", "yes", "no"))
    write_pairs(out, folder / "pairs.parquet")
    return out


def test_sweep_writes_one_shard_per_pair_and_a_long_table(tiny, pairs, tmp_path):
    summary = patch_pairs(tiny, pairs, SITES, tmp_path / "out")
    assert summary == {"pairs": 4, "done": 4, "skipped": 0, "cells": summary["cells"]}
    assert len(list((tmp_path / "out" / "shards").glob("*.parquet"))) == 4
    table = load_results(tmp_path / "out")
    assert list(table.columns) == COLUMNS
    assert len(table) == summary["cells"] and set(table["pair_id"]) == {p.id for p in pairs}
    assert set(table["answer_scoring"]) == {"first_token"}
    heads = table[table["component"] == "cross_attn"]
    assert heads["head"].notna().all() and heads["position"].notna().all()
    mlp = table[table["component"] == "mlp"]
    assert mlp["position"].isna().all() and set(mlp["token"]) == {"<all>"}
    first = heads[heads["pair_id"] == "smp/0"].sort_values(["layer", "head", "position"])
    assert first["token"].iloc[0] == "[CLS]"
    assert not np.isinf(table["normalized_effect"]).any()


def test_rerun_after_a_kill_skips_finished_pairs_and_completes(tiny, pairs, tmp_path):
    out = tmp_path / "out"
    calls = []

    def killed_during_the_second_pair(n, skipped=False):
        calls.append(n)
        if list((out / "shards").glob("*.parquet")):
            raise KeyboardInterrupt  # as if the process died mid-pair
    with pytest.raises(KeyboardInterrupt):
        patch_pairs(tiny, pairs, SITES, out, progress=killed_during_the_second_pair)
    finished = list((out / "shards").iterdir())
    assert len(finished) == 1 and finished[0].suffix == ".parquet"  # no half-written shard left behind
    stamp = finished[0].stat().st_mtime_ns
    summary = patch_pairs(tiny, pairs, SITES, out)
    assert (summary["done"], summary["skipped"]) == (3, 1)
    assert finished[0].stat().st_mtime_ns == stamp
    patch_pairs(tiny, pairs, SITES, tmp_path / "fresh")
    key = ["pair_id", "site"]
    resumed = load_results(out).sort_values(key).reset_index(drop=True)
    fresh = load_results(tmp_path / "fresh").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed, fresh)


def test_rerun_with_other_settings_is_refused(tiny, pairs, tmp_path):
    patch_pairs(tiny, pairs[:1], SITES, tmp_path / "out")
    with pytest.raises(NoticeError, match="direction differ"):
        patch_pairs(tiny, pairs[:1], SITES, tmp_path / "out", direction="noise")


def test_xarray_view_is_sample_by_layer_by_head_by_position(tiny, pairs, tmp_path):
    patch_pairs(tiny, pairs, SITES, tmp_path / "out")
    table = load_results(tmp_path / "out")
    view = results_xarray(table, "text", "cross_attn", "normalized_effect")
    assert view.dims == ("sample", "layer", "head", "position")
    assert view.sizes["layer"] == 2 and view.sizes["head"] == 4 and view.sizes["sample"] == 4
    row = table[(table["pair_id"] == "str/0") & (table["site"] == "text.1.cross_attn.head2@3")].iloc[0]
    assert float(view.sel(sample="str/0", layer=1, head=2, position=3)) == pytest.approx(row["normalized_effect"])
    whole = results_xarray(table, "text", "mlp", "kl")
    assert list(whole["head"].values) == [-1] and list(whole["position"].values) == [-1]
    with pytest.raises(NoticeError, match="no rows for vision"):
        results_xarray(table, "vision", "mlp")


def test_cli_patch_writes_results_and_resumes(tiny_blip_dir, pairs, tmp_path):
    runner = CliRunner()
    pairs_file = tmp_path / "pairs.parquet"
    write_pairs(pairs, pairs_file)
    args = ["patch", str(pairs_file), "--model", str(tiny_blip_dir), "--sites", "text.*.cross_attn.head*,decoder.*.mlp",
            "--direction", "denoise", "--out", str(tmp_path / "out"), "--max-memory", "1GB", "--limit", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 pairs patched, 0 already done" in first.output
    again = runner.invoke(app, args[:-1] + ["3"])
    assert again.exit_code == 0, again.output
    assert "1 pairs patched, 2 already done" in again.output
    assert set(load_results(tmp_path / "out")["pair_id"]) == {"smp/0", "smp/1", "smp/2"}


def test_cli_patch_bad_site_is_one_line_error(tiny_blip_dir, pairs, tmp_path):
    pairs_file = tmp_path / "pairs.parquet"
    write_pairs(pairs, pairs_file)
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(tiny_blip_dir), "--sites",
                                      "text.*.cross_atn", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown component 'cross_atn'" in result.output and "self_attn, cross_attn, mlp" in result.output
