"""Bad input, as a new user would type it: one line naming the value, file, row or pair and the fix,
exit code 2, no traceback, and nothing written (the workspace is compared file by file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import dataset_fixtures
import helpers
from notice.cli import app
from notice.models import load_tokenizer
from notice.pairs import read_pairs, write_pairs
from notice.store import ResultStore
from notice.tasks import build_pairs
from results_fixtures import synthetic_table

runner = CliRunner()

GOOD_CONFIG = "tasks: [{task: easyvqa-color, limit: 2}]\nout: run-out\n"
CONFIGS = {  # run configs, each wrong in one way (out is read from the config's folder)
    "limit-twenty": "tasks: [{task: easyvqa-color, limit: twenty}]\nout: run-out\n",
    "threshold-high": GOOD_CONFIG + "select: {threshold: high}\n",
    "tasks-string": "tasks: easyvqa-color\nout: run-out\n",
    "corruptions-string": "tasks: [{task: easyvqa-color, corruptions: image_smp}]\nout: run-out\n",
    "seed-text": GOOD_CONFIG + "seed: abc\n",
    "device-absent": GOOD_CONFIG + "device: cuda:99\n",
    "data-missing": "tasks: [{task: mit-states, data: nowhere}]\nout: run-out\n",
    "sites-empty": GOOD_CONFIG + "patch: {sites: []}\n",
    "sites-unknown-component": GOOD_CONFIG + "patch: {sites: [text.*.nope]}\n",
    "max-memory-zero": GOOD_CONFIG + "patch: {max_memory: 0}\n",
    "task-unknown": "tasks: [vqa-v2]\nout: run-out\n",
    "section-not-mapping": GOOD_CONFIG + "select: 3\n",
    "out-is-file": "tasks: [easyvqa-color]\nout: ../file.txt\n",
    "rule-unknown": GOOD_CONFIG + "report: {rule: [default, paper]}\n",
    "good": GOOD_CONFIG,
}
LONG_QUESTION = "is the shape " + "very " * 30 + "red or blue?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Inputs for every row: pairs files good and bad, an image, a results folder, configs."""
    root = tmp_path_factory.mktemp("bad-inputs")
    build_pairs("easyvqa-color", root / "pairs.parquet", load_tokenizer("easyvqa-blip"), limit=2,
                corruptions=["image_smp", "text_str"])
    pairs = read_pairs(root / "pairs.parquet")
    gone = pairs[1].__class__(**{**pairs[1].__dict__, "corrupt_image": str(root / "gone.png")})
    write_pairs([pairs[0], gone, *pairs[2:]], root / "missing-image.parquet")
    frame = pd.read_parquet(root / "pairs.parquet")
    frame.loc[1, "corruption"] = "blur"
    frame.to_parquet(root / "bad-corruption.parquet")
    frame.iloc[:0].to_parquet(root / "empty.parquet")
    long = pairs[0].__class__(**{**pairs[0].__dict__, "id": "long/0", "clean_prompt": LONG_QUESTION,
                                 "corrupt_prompt": LONG_QUESTION, "correct": "red", "incorrect": "blue"})
    write_pairs([pairs[0], long], root / "long-prompt.parquet")
    uneven = pairs[0].__class__(**{**pairs[0].__dict__, "id": "uneven/0", "corruption": "text_str",
                                   "corrupt_prompt": pairs[0].clean_prompt.replace("shape", "purplish shape")})
    write_pairs([uneven], root / "uneven.parquet")  # as if made under another model's tokenizer
    (root / "not-parquet.parquet").write_text("id,task\n1,2\n")
    (root / "file.txt").write_text("a file where a folder belongs\n")
    helpers.shape_image(64).save(root / "image.png")
    table = synthetic_table({"color/image": [(1, 1)]}, layers=2, heads=4)  # one condition
    store = ResultStore(root / "results", {"model": "easyvqa-blip"})
    for pair_id, rows in table.groupby("pair_id"):
        store.write(pair_id, rows)
    dataset_fixtures.facial_expressions(root / "fer")  # has a surprise class: "surprised" outgrows 32 positions
    (root / "configs").mkdir()
    for name, text in CONFIGS.items():
        (root / "configs" / f"{name}.yaml").write_text(text)
    return root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HAS_CUDA = torch.cuda.is_available()
ROWS = [
    # devices
    (["ask", "{w}/image.png", "what color is the shape?", "--device", "cuda:99"], "cuda:99"),
    pytest.param(["ask", "{w}/image.png", "what color is the shape?", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA"), id="ask-cuda-without-cuda"),
    (["select", "{w}/pairs.parquet", "--out", "{w}/selected.parquet", "--device", "cuda:99"], "cuda:99"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--device", "cuda:99"], "cuda:99"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--device", "tpu"], "'tpu' is not a device"),
    # output paths of the wrong kind
    (["patch", "{w}/pairs.parquet", "--out", "{w}/file.txt"], "file.txt is a file"),
    (["report", "{w}/results", "--out", "{w}/file.txt"], "file.txt is a file"),
    (["pairs", "easyvqa-color", "--out", "{w}/results", "--limit", "2"], "results is a folder"),
    (["pairs", "easyvqa-color", "--out", "{w}/file.txt/pairs.parquet", "--limit", "2"], "is a file, so no folder"),
    (["select", "{w}/pairs.parquet", "--out", "{w}/results"], "results is a folder"),
    (["evaluate", "--images", "1", "--out", "{w}/results"], "results is a folder"),
    (["run", "{w}/configs/good.yaml", "--out", "{w}/file.txt"], "file.txt is a file"),
    (["demo", "--out", "{w}/file.txt"], "file.txt is a file"),
    # run configs
    (["run", "{w}/configs/limit-twenty.yaml"], "tasks[0].limit 'twenty' is not a whole number"),
    (["run", "{w}/configs/threshold-high.yaml"], "select.threshold 'high' is not a number"),
    (["run", "{w}/configs/tasks-string.yaml"], "tasks must be a list"),
    (["run", "{w}/configs/corruptions-string.yaml"], "tasks[0].corruptions must be a list of corruptions"),
    (["run", "{w}/configs/seed-text.yaml"], "seed 'abc' is not a whole number"),
    (["run", "{w}/configs/device-absent.yaml"], "device cuda:99"),
    (["run", "{w}/configs/data-missing.yaml"], "tasks[0].data {w}/configs/nowhere: folder not found"),
    (["run", "{w}/configs/sites-empty.yaml"], "patch.sites names no site pattern"),
    (["run", "{w}/configs/sites-unknown-component.yaml"], "unknown component 'nope'"),
    (["run", "{w}/configs/max-memory-zero.yaml"], "patch.max_memory 0 leaves no memory"),
    (["run", "{w}/configs/task-unknown.yaml"], "unknown task 'vqa-v2'"),
    (["run", "{w}/configs/section-not-mapping.yaml"], "select must be a mapping"),
    (["run", "{w}/configs/out-is-file.yaml"], "file.txt is a file"),
    (["run", "{w}/configs/no-such.yaml"], "config not found"),
    (["run", "{w}/configs/rule-unknown.yaml"], "report.rule has unknown head-selection rule(s) paper"),
    # report
    (["report", "{w}/results", "--out", "{w}/report", "--min-conditions", "5"], "min_conditions 5 is not within the 1 condition(s)"),
    (["report", "{w}/results", "--out", "{w}/report", "--top-k", "0"], "--top-k must be at least 1"),
    (["report", "{w}/no-results", "--out", "{w}/report"], "no-results: folder not found"),
    (["report", "{w}/results", "--out", "{w}/report", "--pairs", "{w}/nope.parquet"], "nope.parquet: file not found"),
    (["report", "{w}/results", "--out", "{w}/report", "--rule", "default,paper"], "--rule has unknown head-selection"),
    (["report", "{w}/results", "--out", "{w}/report", "--rule", "notice"], "notice reads where each answer word sits"),
    (["pairs", "easyvqa-color", "--out", "{w}/p.parquet", "--str-form", "two"], "--str-form: unknown STR form 'two'"),
    # prompts longer than the model reads (the embedded BLIP reads 32 positions)
    (["pairs", "facial-expressions", "--data", "{w}/fer", "--out", "{w}/fer.parquet"], "more than the 32"),
    (["ask", "{w}/image.png", LONG_QUESTION], "more than the 32"),
    (["patch", "{w}/long-prompt.parquet", "--out", "{w}/res", "--sites", "text.0.mlp"], "pair long/0 (row 2)"),
    (["patch", "{w}/uneven.parquet", "--out", "{w}/res", "--sites", "text.0.mlp"], "a pair needs one length"),
    # ranges and empty choices
    (["ask", "{w}/image.png", "what color is the shape?", "--top", "-3"], "--top must be at least 1, not -3"),
    (["ask", "{w}/image.png", "what color is the shape?", "--top", "0"], "--top must be at least 1, not 0"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--batch-size", "-1"], "--batch-size must be at least 1"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--sites", ""], "--sites names no site pattern"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--sites", " , "], "--sites names no site pattern"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--limit", "0"], "--limit must be at least 1"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--max-memory", "0"], "--max-memory '0' leaves no memory"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--max-memory", "1KB"], "--max-memory 0.00 GiB is too small"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--max-memory", "lots"], "bad memory size 'lots'"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--direction", "sideways"], "unknown direction 'sideways'"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--sites", "text.7.mlp"], "layer 7 out of range"),
    (["patch", "{w}/pairs.parquet", "--out", "{w}/res", "--sites", "text..mlp"], "bad site pattern 'text..mlp'"),
    (["select", "{w}/pairs.parquet", "--out", "{w}/s.parquet", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["select", "{w}/pairs.parquet", "--out", "{w}/s.parquet", "--threshold", "-1"], "--threshold must be 0 or more"),
    (["select", "{w}/pairs.parquet", "--out", "{w}/s.parquet", "--max-per-cell", "0"], "--max-per-cell must be at"),
    (["evaluate", "--images", "0"], "--images must be at least 1"),
    (["evaluate", "--split", "val"], "unknown split 'val'"),
    (["train-default", "--family", "gpt"], "unknown family 'gpt'"),
    (["train-default", "--threads", "0"], "--threads must be at least 1"),
    (["pairs", "easyvqa-color", "--out", "{w}/p.parquet", "--limit", "0"], "--limit must be at least 1"),
    (["pairs", "easyvqa-color", "--out", "{w}/p.parquet", "--corruptions", ","], "names no corruption"),
    (["pairs", "mit-states", "--out", "{w}/p.parquet", "--data", "{w}/nowhere"], "nowhere: folder not found"),
    (["pairs", "vqa-v2", "--out", "{w}/p.parquet"], "unknown task 'vqa-v2'"),
    # models
    (["info", "--model", "not-a-model-name"], "not-a-model-name"),
    (["info", "--model", "easyvqa-blp"], "did you mean easyvqa-blip?"),
    (["info", "--model", "{w}/no-such-folder"], "is not a folder written by save_pretrained"),
    (["info", "--model", "{w}/file.txt"], "is not a folder written by save_pretrained"),
    (["pairs", "easyvqa-color", "--out", "{w}/p.parquet", "--model", "nope"], "'nope'"),
    # pairs files
    (["select", "{w}/missing-image.parquet", "--out", "{w}/s.parquet"], "row 2 of "),
    (["patch", "{w}/missing-image.parquet", "--out", "{w}/res"], "corrupt_image not found"),
    (["select", "{w}/bad-corruption.parquet", "--out", "{w}/s.parquet"], "row 2 of "),
    (["patch", "{w}/bad-corruption.parquet", "--out", "{w}/res"], "unknown corruption 'blur'"),
    (["patch", "{w}/not-parquet.parquet", "--out", "{w}/res"], "it must be Parquet"),
    (["patch", "{w}/empty.parquet", "--out", "{w}/res"], "holds no pairs"),
    (["select", "{w}/no-such.parquet", "--out", "{w}/s.parquet"], "pairs file not found"),
    (["ask", "{w}/results", "what color is the shape?"], "image not found"),
]


def _params(rows):
    """Rows as pytest params named by verb, options and input, e.g. patch-batch-size-pairs."""
    for row in rows:
        if type(row) is not tuple:  # already a pytest.param
            yield row
            continue
        argv = row[0]
        name = [argv[0]] + [a.lstrip("-") for a in argv[1:] if a.startswith("--")] + [Path(argv[1]).stem]
        yield pytest.param(*row, id="-".join(name))


@pytest.mark.parametrize("argv, expected", list(_params(ROWS)))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(workspace, argv, expected):
    before = _files(workspace)
    result = runner.invoke(app, [a.replace("{w}", str(workspace)) for a in argv])
    assert result.exit_code == 2, result.output
    message = result.stderr.rstrip("\n")
    assert message.startswith("error: ") and "\n" not in message, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert expected.replace("{w}", str(workspace)) in message
    assert _files(workspace) == before  # no half-written output, no empty folders


def test_unreadable_samples_are_skipped_and_counted_with_skip_bad(workspace, tmp_path):
    result = runner.invoke(app, ["pairs", "facial-expressions", "--data", str(workspace / "fer"),
                                 "--out", str(tmp_path / "fer.parquet"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "prompt longer than the model reads" in result.output
    assert all("surprised" not in p.clean_prompt for p in read_pairs(tmp_path / "fer.parquet"))


def test_selection_drops_pairs_the_model_cannot_read_and_counts_them(workspace, default_blip):
    from notice.select import select_pairs

    selection = select_pairs(default_blip, read_pairs(workspace / "long-prompt.parquet"), balance=False)
    assert selection.as_dict()["dropped"]["prompt_too_long"] == 1
    assert "long/0" not in {p.id for p in selection.kept}


def test_an_unreachable_hub_is_refused_within_seconds(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the probe goes to a proxy when one is set
    start = time.monotonic()
    result = runner.invoke(app, ["info", "--model", "someone/unreachable-checkpoint"])
    elapsed = time.monotonic() - start
    assert result.exit_code == 2 and "hub cannot be reached" in result.stderr
    assert "easyvqa-blip, easyvqa-llava" in result.stderr
    assert elapsed < 15, f"took {elapsed:.0f} s: the hub's retries are back"  # they took ~26 s


def test_ctrl_c_during_patch_says_what_is_kept_and_a_rerun_resumes(workspace, tmp_path, monkeypatch):
    from notice.patching import engine

    real, calls = engine.patch_pair, []

    def interrupted_on_the_second_pair(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "patch_pair", interrupted_on_the_second_pair)
    argv = ["patch", str(workspace / "pairs.parquet"), "--out", str(tmp_path / "res"), "--sites", "text.0.mlp@all"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 130
    total = len(read_pairs(workspace / "pairs.parquet"))
    assert result.stderr.rstrip("\n") == (f"interrupted: 1 of {total} pairs done and kept in {tmp_path / 'res'}; "
                                     "rerun the same command to resume")
    monkeypatch.setattr(engine, "patch_pair", real)
    resumed = runner.invoke(app, argv)
    assert resumed.exit_code == 0 and f"{total - 1} pairs patched, 1 already done" in resumed.output


def test_version_is_printed():
    from notice import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"notice {__version__}"


def test_a_failed_report_leaves_the_existing_report_as_it_was(workspace, tmp_path):
    """A report that fails leaves an existing report folder exactly as it was."""
    copy = tmp_path / "w"
    shutil.copytree(workspace, copy)
    first = runner.invoke(app, ["report", str(copy / "results"), "--out", str(copy / "report")])
    assert first.exit_code == 0, first.output
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "report").rglob("*")}
    failed = runner.invoke(app, ["report", str(copy / "results"), "--out", str(copy / "report"),
                                 "--min-conditions", "2"])
    assert failed.exit_code == 2
    assert {p: p.stat().st_mtime_ns for p in (copy / "report").rglob("*")} == stamps


def test_ctrl_c_during_run_keeps_finished_steps_and_says_so(tmp_path, monkeypatch):
    from notice.patching import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    config = tmp_path / "run.yaml"
    config.write_text("tasks: [{task: easyvqa-color, limit: 8}]\nout: run\npatch: {sites: [text.0.mlp@all]}\n")
    monkeypatch.setattr(engine, "patch_pair", interrupted)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 130
    assert result.stderr.rstrip("\n") == (f"interrupted: finished steps and 0 patched pair(s) are kept in "
                                          f"{tmp_path / 'run'}; rerun the same command to resume")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "pairs", "selected"}
