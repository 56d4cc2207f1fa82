"""The main job end to end on the embedded model: config → pairs → selection → patching → report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from notice.cli import app
from notice.models import EMBEDDED
from notice.pairs import read_pairs
from notice.store import load_results

pytestmark = pytest.mark.skipif(not (EMBEDDED["easyvqa-blip"] / "model.safetensors").is_file(),
                                reason="embedded model not trained yet")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    config = {"model": "easyvqa-blip", "out": str(folder / "run"), "title": "small run", "seed": 0,
              "tasks": [{"task": "easyvqa-color", "split": "test", "limit": 24,
                         "corruptions": ["image_smp", "text_str_both"]},
                        {"task": "easyvqa-shape", "split": "test", "limit": 40, "corruptions": ["image_smp"]}],
              "select": {"max_per_cell": 1},
              "patch": {"sites": ["text.*.layer", "text.*.mlp", "text.*.cross_attn.head*"]},
              "report": {"rule": ["default", "notice"]}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    return folder / "run", path


def test_run_writes_pairs_selection_results_and_report(run_folder):
    run, _ = run_folder
    selected = [p for f in sorted((run / "selected").glob("*.parquet")) for p in read_pairs(f)]
    assert selected and all(p.metadata["selection"]["clean_logit_diff"] > 0 for p in selected)
    table = load_results(run / "results")
    assert set(table["pair_id"]) == {p.id for p in selected}
    assert set(table["component"]) == {"layer", "mlp", "cross_attn"}
    page = (run / "report" / "index.html").read_text()
    for expected in ("easyvqa-color/image", "easyvqa-shape/image", "Universal heads", "What the heads do",
                     "Head-selection rules (default, notice)", "Rules side by side"):
        assert expected in page
    # the paper's STR form is a corruption of its own, from selection to the report
    counts = json.loads((run / "selected" / "easyvqa-color.selection.json").read_text())["by_corruption"]
    assert counts["text_str_both"]["input"] > 0 and "text_str" not in counts
    assert set(table["corruption"]) <= {"image_smp", "text_str_both"}


def test_rerun_resumes_and_redoes_only_what_is_missing(run_folder):
    run, config = run_folder
    shards = sorted((run / "results" / "shards").glob("*.parquet"))
    lost = shards[0]
    lost.unlink()  # as if the run had been killed while patching this pair
    kept_times = {p: p.stat().st_mtime_ns for p in shards[1:]}
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert lost.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in kept_times.items())


def test_report_verb_rebuilds_the_report_from_a_run_folder(run_folder, tmp_path):
    run, _ = run_folder
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert "What the heads do" in (tmp_path / "again" / "index.html").read_text()
    # every condition the run asked for, with the selection's counts read from beside its pairs files
    conditions = pd.read_csv(tmp_path / "again" / "tables" / "conditions.csv", keep_default_na=False)
    assert set(conditions["condition"]) == {"easyvqa-color/image/smp", "easyvqa-color/text/str_both",
                                            "easyvqa-shape/image/smp"}
    assert (conditions["input"] > 0).all() and (conditions["selected"] >= conditions["analysed"]).all()
    assert all(reason.split(" kept")[0].split(" of ")[-1].isdigit() for reason in conditions["reason"] if reason)


def test_report_verb_lists_heads_by_the_paper_rule_with_scored_and_unscored_counts(run_folder, tmp_path):
    run, _ = run_folder
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rules"), "--rule", "notice",
                                      "--rule", "notice-code"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rules" / "index.html").read_text()
    for expected in ("Universal heads by rule notice (", "Important heads by rule notice-code", "Pairs scored"):
        assert expected in page
    table = load_results(run / "results")
    coverage = pd.read_csv(tmp_path / "rules" / "tables" / "pairs-notice.csv", keep_default_na=False)
    assert set(coverage["pair_id"]) == set(table["pair_id"]) and (coverage["reason"] == "").all()
    code = pd.read_csv(tmp_path / "rules" / "tables" / "pairs-notice-code.csv").set_index("pair_id")
    assert (code.loc[coverage["pair_id"], "position"].to_numpy() == coverage["position"].to_numpy() - 1).all()


def test_report_rule_needs_the_pairs_and_a_known_name(run_folder, tmp_path):
    run, _ = run_folder
    bare = CliRunner().invoke(app, ["report", str(run / "results"), "--out", str(tmp_path / "a"), "--rule", "notice"])
    assert bare.exit_code == 2 and "pass --pairs" in bare.output and "Traceback" not in bare.output
    wrong = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "b"), "--rule", "paper"])
    assert wrong.exit_code == 2 and "unknown head-selection rule(s) paper" in wrong.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", ["blip", "llava", "mllama"])
def test_demo_selects_48_pairs_for_every_condition_of_each_family(tmp_path, family):
    """Colour and shape, each corrupted in the image (SMP) and in the text (yes/no STR), and a
    Gaussian-noise baseline: every condition keeps at least 48 pairs on the embedded model."""
    import json

    from notice.models import load_model
    from notice.pipeline import demo_configs, select_steps
    from notice.select import selection_report_path

    config = next(c for c in demo_configs(tmp_path) if c.model == f"easyvqa-{family}")
    kept = {}
    for path in select_steps(config, load_model(config.model)):
        for corruption, counts in json.loads(selection_report_path(path).read_text())["by_corruption"].items():
            kept[(path.stem, corruption)] = counts["kept"]
    assert set(kept) == {("easyvqa-color", "image_smp"), ("easyvqa-color", "text_str_yesno"),
                         ("easyvqa-shape", "image_smp"), ("easyvqa-shape", "text_str_yesno"),
                         ("easyvqa-shape", "image_noise")}
    assert min(kept.values()) >= 48, kept
