"""What notice writes: files others may read (the umask decides), and where results came from."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from notice import __version__
from notice.cli import app
from notice.io import atomic_path
from notice.pairs import pairs_provenance

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """pairs → select → patch → report on the embedded BLIP, under umask 022."""
    folder = tmp_path_factory.mktemp("outputs")
    previous = os.umask(0o022)
    try:
        for argv in (["pairs", "easyvqa-color", "--out", "{f}/pairs.parquet", "--limit", "4", "--seed", "3",
                      "--corruptions", "image_smp,text_str"],
                     ["select", "{f}/pairs.parquet", "--out", "{f}/selected.parquet", "--no-balance"],
                     ["patch", "{f}/selected.parquet", "--out", "{f}/results", "--sites", "text.0.mlp@all"],
                     ["report", "{f}/results", "--out", "{f}/report", "--pairs", "{f}/selected.parquet"]):
            result = runner.invoke(app, [a.replace("{f}", str(folder)) for a in argv])
            assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    return folder


def test_every_file_and_folder_is_readable_by_others(run):
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
    files = {name for name in modes if (run / name).is_file()}
    assert files >= {"pairs.parquet", "selected.parquet", "selected.selection.json", "results/run.json",
                     "report/index.html", "report/report.json", "report/plotly.min.js"}
    assert any(name.startswith("results/shards/") for name in files)
    assert any(name.startswith("pairs_files/") for name in files)  # the derived images
    assert {name: mode for name, mode in modes.items() if name in files and mode != 0o644} == {}
    assert {name: mode for name, mode in modes.items() if name not in files and mode != 0o755} == {}


def test_atomic_writes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "table.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "table.json").stat().st_mode) == 0o640


def test_run_json_records_version_seed_and_the_pairs_file_with_its_hash(run):
    manifest = json.loads((run / "results" / "run.json").read_text())
    digest = hashlib.sha256((run / "selected.parquet").read_bytes()).hexdigest()
    assert manifest["version"] == __version__ and manifest["seed"] == 3
    assert manifest["pairs"] == [{"file": str((run / "selected.parquet").resolve()), "sha256": digest}]
    assert {"model", "sites", "direction", "dtype"} <= set(manifest)


def test_pairs_files_carry_what_made_them_through_selection(run):
    made = pairs_provenance(run / "pairs.parquet")
    assert made["seed"] == 3 and made["task"] == "easyvqa-color" and made["model"] == "easyvqa-blip"
    assert made["version"] == __version__ and made["corruptions"] == ["image_smp", "text_str"]
    selected = pairs_provenance(run / "selected.parquet")
    assert selected["seed"] == 3 and selected["selection"]["balance"] is False


def test_pairs_of_another_seed_are_refused_and_more_pairs_are_recorded(run, tmp_path):
    other = tmp_path / "other.parquet"
    made = runner.invoke(app, ["pairs", "easyvqa-color", "--out", str(other), "--limit", "4", "--seed", "4",
                               "--corruptions", "image_smp"])
    assert made.exit_code == 0, made.output
    results = run / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    refused = runner.invoke(app, ["patch", str(other), "--out", str(results), "--sites", "text.0.mlp@all"])
    assert refused.exit_code == 2 and "(seed differ)" in refused.stderr  # same pair ids, other partners
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    same = runner.invoke(app, ["patch", str(run / "selected.parquet"), "--out", str(results), "--sites",
                               "text.0.mlp@all"])
    assert same.exit_code == 0 and "0 pairs patched" in same.output  # the same pairs resume
    assert (results / "run.json").stat().st_mtime_ns == before[results / "run.json"]
    more = runner.invoke(app, ["patch", str(run / "pairs.parquet"), "--out", str(results), "--sites",
                               "text.0.mlp@all"])  # the unselected pairs of the same build: more pairs join
    assert more.exit_code == 0, more.output
    recorded = json.loads((results / "run.json").read_text())["pairs"]
    assert [Path(r["file"]).name for r in recorded] == ["selected.parquet", "pairs.parquet"]
