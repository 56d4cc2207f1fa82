"""Run configs: read strictly, with one-line errors naming the key or value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from notice.errors import NoticeError
from notice.pipeline import DEFAULT_SITES, demo_configs, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "data" / "mit-states").mkdir(parents=True)  # where the config says its data is
    mit = load_config(tmp_path / "configs" / "blip-vqa-base-mit-states.yaml")
    assert mit.model == "Salesforce/blip-vqa-base"
    assert mit.tasks[0].task == "mit-states" and len(mit.tasks[0].corruptions) == 4
    assert Path(mit.tasks[0].data) == tmp_path / "data" / "mit-states"
    assert mit.out == tmp_path / "runs" / "blip-vqa-base-mit-states"  # out is read from the config's folder too
    demo = load_config(ROOT / "configs" / "easyvqa-demo.yaml", out=tmp_path)
    assert demo.out == tmp_path and demo.sites == DEFAULT_SITES
    blip_demo = next(c for c in demo_configs(tmp_path) if c.model == demo.model)
    assert demo.tasks == blip_demo.tasks and demo.max_per_cell == blip_demo.max_per_cell  # the config is the demo


@pytest.mark.parametrize("text, message", [
    ("tasks: [easyvqa-color]\nout: x\nmodle: y\n", "unknown key\\(s\\) modle"),
    ("tasks: [easyvqa-color]\nout: x\nselect: {treshold: 1}\n", "treshold under select"),
    ("out: x\n", "at least one entry under tasks"),
    ("tasks: [{task: easyvqa-color, corruptions: [blur]}]\nout: x\n", "unknown corruption\\(s\\) blur"),
    ("tasks: [easyvqa-color]\n", "out: FOLDER"),
    ("tasks: [easyvqa-color\n", "not valid YAML"),
    ("tasks: [easyvqa-color]\nout: x\nreport: {rule: [default, paper]}\n", "report.rule has unknown head-selection rule\\(s\\) paper"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(NoticeError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_report_rules_take_one_name_or_a_list(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tasks: [easyvqa-color]\nout: x\nreport: {rule: notice}\n")
    assert load_config(path).rule == ("notice",)
    path.write_text("tasks: [easyvqa-color]\nout: x\nreport: {rule: [notice-code, default]}\n")
    assert load_config(path).rule == ("default", "notice-code")
    path.write_text("tasks: [easyvqa-color]\nout: x\n")
    assert load_config(path).rule == ("default",)


def test_models_side_by_side_in_processes_give_the_one_process_results(tmp_path):
    """The demo's way: each model's steps in a worker process, bars and lines relayed to this console."""
    import io

    import pandas as pd
    from rich.console import Console

    from notice.executors.processes import run_models
    from notice.pipeline import RunConfig, TaskSpec, run_steps

    def configs(folder):
        task = [TaskSpec("easyvqa-color", split="test", limit=2, max_per_cell=1, corruptions=("image_smp",))]
        return [RunConfig(out=folder / "blip", tasks=task, model="easyvqa-blip", balance=False,
                          sites=("text.*.cross_attn.head*",)),
                RunConfig(out=folder / "llava", tasks=task, model="easyvqa-llava", balance=False,
                          sites=("lm.*.self_attn.head*",))]

    shown = io.StringIO()
    side_by_side = run_models(configs(tmp_path / "two"), Console(file=shown, width=200), processes=2)
    alone = [run_steps(config, Console(file=io.StringIO())) for config in configs(tmp_path / "one")]
    for got, expected in zip(side_by_side, alone):
        assert got.name == expected.name and len(got.table) > 0
        columns = ["pair_id", "site", "ld", "normalized_effect", "kl"]
        pd.testing.assert_frame_equal(got.table[columns].sort_values(["pair_id", "site"]).reset_index(drop=True),
                                      expected.table[columns].sort_values(["pair_id", "site"]).reset_index(drop=True),
                                      atol=1e-5, rtol=1e-4)
        assert f"{got.name}: selected" in shown.getvalue()
