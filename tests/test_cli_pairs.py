"""`notice pairs` and `notice select` end to end on fixtures of every task and a real (tiny) model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

import dataset_fixtures
import helpers
from notice.cli import app
from notice.models import EMBEDDED
from notice.pairs import read_pairs
from notice.select import select_pairs, selection_report_path

runner = CliRunner()

FIXTURES = {"svo-probes": dataset_fixtures.svo_probes, "mit-states": dataset_fixtures.mit_states,
            "facial-expressions": dataset_fixtures.facial_expressions}


@pytest.mark.parametrize("task", ["svo-probes", "mit-states", "facial-expressions", "easyvqa-color"])
def test_pairs_then_select_on_every_task(task, tmp_path, tiny_blip_dir, tiny_blip):
    args = ["pairs", task, "--out", str(tmp_path / "pairs.parquet"), "--model", str(tiny_blip_dir), "--limit", "3"]
    if task in FIXTURES:
        args += ["--data", str(FIXTURES[task](tmp_path / "data"))]
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    pairs = read_pairs(tmp_path / "pairs.parquet")
    assert {p.corruption for p in pairs} >= {"image_smp", "image_noise", "text_noise"}
    assert f"wrote {len(pairs)} pairs" in made.output

    out = tmp_path / "selected.parquet"
    chosen = runner.invoke(app, ["select", str(tmp_path / "pairs.parquet"), "--model", str(tiny_blip_dir),
                                 "--out", str(out), "--no-balance"])
    expected = select_pairs(tiny_blip, pairs, balance=False).as_dict()
    for filter_name, count in expected["dropped"].items():  # the CLI prints what the library counts
        assert f"dropped {count}: {filter_name}" in chosen.output
    if expected["kept"]:  # a random tiny model rarely answers right; both outcomes must be exact
        assert chosen.exit_code == 0, chosen.output
        assert json.loads(selection_report_path(out).read_text())["dropped"] == expected["dropped"]
        assert len(read_pairs(out)) == expected["kept"]
    else:
        assert chosen.exit_code == 2 and "no pair passed selection" in chosen.output
        assert not out.exists() and not selection_report_path(out).exists()
    assert expected["input"] == len(pairs)


def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, tiny_blip_dir):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    pd.read_csv(data / "svo_probes.csv").drop(columns=["pos_image_id"]).to_csv(data / "svo_probes.csv", index=False)
    result = runner.invoke(app, ["pairs", "svo-probes", "--data", str(data), "--out", str(tmp_path / "p.parquet"),
                                 "--model", str(tiny_blip_dir)])
    assert result.exit_code == 2
    assert "lacks column(s) pos_image_id" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "p_files").exists()


def test_skip_bad_reports_what_it_skipped(tmp_path, tiny_blip_dir):
    data = dataset_fixtures.mit_states(tmp_path / "mit", {"old car": 2, "new car": 2, "rusty car": 0})
    stopped = runner.invoke(app, ["pairs", "mit-states", "--data", str(data), "--out", str(tmp_path / "p.parquet"),
                                  "--model", str(tiny_blip_dir)])
    assert stopped.exit_code == 2 and "--skip-bad" in stopped.output
    skipped = runner.invoke(app, ["pairs", "mit-states", "--data", str(data), "--out", str(tmp_path / "p.parquet"),
                                  "--model", str(tiny_blip_dir), "--skip-bad"])
    assert skipped.exit_code == 0 and "skipped 1: empty class folder" in skipped.output


def test_unknown_task_and_corruption_are_refused(tmp_path, tiny_blip_dir):
    base = ["--out", str(tmp_path / "p.parquet"), "--model", str(tiny_blip_dir)]
    result = runner.invoke(app, ["pairs", "vqa-v2", *base])
    assert result.exit_code == 2 and "unknown task 'vqa-v2'" in result.output
    result = runner.invoke(app, ["pairs", "easyvqa-color", "--corruptions", "image_blur", *base])
    assert result.exit_code == 2 and "unknown corruption(s) image_blur" in result.output


@pytest.mark.skipif(not EMBEDDED["easyvqa-blip"].is_dir(), reason="the embedded default model is not built yet")
def test_default_model_keeps_most_easy_vqa_colour_pairs(tmp_path):
    made = runner.invoke(app, ["pairs", "easyvqa-color", "--out", str(tmp_path / "p.parquet"), "--limit", "20"])
    assert made.exit_code == 0, made.output
    chosen = runner.invoke(app, ["select", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "s.parquet"),
                                 "--no-balance"])
    assert chosen.exit_code == 0, chosen.output
    report = json.loads(selection_report_path(tmp_path / "s.parquet").read_text())
    smp = report["by_corruption"]["image_smp"]
    assert smp["kept"] >= 0.8 * smp["input"]  # a colour-trained model answers and flips on exact recolouring


def test_paper_str_form_swaps_both_options_and_selection_counts_it_apart(tmp_path, tiny_blip_dir, tiny_blip):
    out = tmp_path / "pairs.parquet"
    made = runner.invoke(app, ["pairs", "easyvqa-color", "--str-form", "both", "--corruptions", "image_smp,text_str",
                               "--out", str(out), "--model", str(tiny_blip_dir), "--limit", "3"])
    assert made.exit_code == 0, made.output
    pairs = read_pairs(out)
    both = [p for p in pairs if p.corruption == "text_str_both"]
    assert both and {p.corruption for p in pairs} == {"image_smp", "text_str_both"}
    for pair in both:
        helpers.assert_both_options_swapped(pair, tiny_blip.tokenizer)
    chosen = runner.invoke(app, ["select", str(out), "--model", str(tiny_blip_dir), "--out",
                                 str(tmp_path / "selected.parquet"), "--no-balance"], env={"COLUMNS": "200"})
    assert "text_str_both" in chosen.output  # its own row of the selection table
    counts = select_pairs(tiny_blip, pairs, balance=False).as_dict()["by_corruption"]
    assert counts["text_str_both"]["input"] == len(both) and counts["image_smp"]["input"] == len(pairs) - len(both)
    refused = runner.invoke(app, ["pairs", "easyvqa-color", "--str-form", "two", "--out", str(tmp_path / "x.parquet"),
                                  "--model", str(tiny_blip_dir)])
    assert refused.exit_code == 2 and "--str-form: unknown STR form 'two'; use one of one, both" in refused.output
