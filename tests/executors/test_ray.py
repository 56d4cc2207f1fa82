"""Sweeps on a local Ray cluster started by the test: the same table as one process, nothing lost
when a worker is killed mid-sweep, and a wrong address refused in one line."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import helpers
from notice.models import load_model
from notice.pairs import write_pairs
from notice.patching.engine import patch_pairs
from notice.store import load_results

ray = pytest.importorskip("ray")
SITES = ["text.*.cross_attn.head*", "text.*.mlp", "decoder.*.mlp"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_pairs(tmp_path_factory):
    """Twelve pairs of every corruption kind, with unique ids."""
    pairs = []
    for copy in range(3):
        made = helpers.make_pairs(tmp_path_factory.mktemp(f"pairs{copy}"), helpers.TINY_BLIP["image_size"])
        pairs += [dataclasses.replace(p, id=f"{p.id}-{copy}") for p in made.values()]
    return pairs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_blip_dir, sweep_pairs):
    out = tmp_path_factory.mktemp("one-process") / "results"
    patch_pairs(load_model(str(tiny_blip_dir)), sweep_pairs, SITES, out, model_name=str(tiny_blip_dir))
    return _sorted(load_results(out))


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["pair_id", "site"]).reset_index(drop=True)


def _same(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    table = _sorted(table)
    assert table["pair_id"].tolist() == reference["pair_id"].tolist()
    assert table["site"].tolist() == reference["site"].tolist()
    for metric in ("ld", "normalized_effect", "p_correct", "kl"):
        np.testing.assert_allclose(table[metric], reference[metric], atol=1e-6, rtol=1e-6, err_msg=metric)


def test_two_workers_give_the_one_process_table(cluster, tiny_blip_dir, sweep_pairs, reference, tmp_path):
    from notice.executors.ray import patch_pairs_on_ray

    seen = {"total": 0, "cells": 0, "pairs": 0}
    summary = patch_pairs_on_ray(str(tiny_blip_dir), sweep_pairs, SITES, tmp_path / "results", workers=2,
                                 on_total=lambda n: seen.__setitem__("total", n),
                                 progress=lambda n, skipped: seen.__setitem__("cells", seen["cells"] + n),
                                 on_pair=lambda: seen.__setitem__("pairs", seen["pairs"] + 1))
    assert summary["done"] == len(sweep_pairs) and summary["failed"] == [] and summary["skipped"] == 0
    assert seen == {"total": len(reference), "cells": len(reference), "pairs": len(sweep_pairs)}
    _same(load_results(tmp_path / "results"), reference)


def test_a_worker_killed_mid_sweep_loses_nothing(cluster, tiny_blip_dir, sweep_pairs, reference, tmp_path):
    from notice.executors.ray import patch_pairs_on_ray

    actors, killed = [], []

    def kill_one_after_the_first_pair() -> None:
        if not killed:  # the other worker is busy with its pair: kill it while it holds one
            pid = ray.get(actors[-1].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "results"
    summary = patch_pairs_on_ray(str(tiny_blip_dir), sweep_pairs, SITES, out, workers=2, on_start=actors.extend,
                                 on_pair=kill_one_after_the_first_pair)
    assert killed and summary["failed"] == [] and summary["done"] == len(sweep_pairs)
    assert summary["retried"] >= 1  # the killed worker held a pair, or was handed the next one: it was run again
    again = patch_pairs_on_ray(str(tiny_blip_dir), sweep_pairs, SITES, out, workers=2)
    assert again["skipped"] == len(sweep_pairs) and again["done"] == 0  # the rerun finds every pair done
    _same(load_results(out), reference)


def test_cli_with_workers_resumes_a_sweep_of_one_process(cluster, tiny_blip_dir, sweep_pairs, reference, tmp_path):
    from typer.testing import CliRunner

    from notice.cli import app

    pairs_file = write_pairs(sweep_pairs, tmp_path / "pairs.parquet")
    out = tmp_path / "results"
    patch_pairs(load_model(str(tiny_blip_dir)), sweep_pairs[:5], SITES, out, model_name=str(tiny_blip_dir))
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(tiny_blip_dir), "--out", str(out),
                                      "--sites", ",".join(SITES), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert f"{len(sweep_pairs) - 5} pairs patched, 5 already done" in result.output
    _same(load_results(out), reference)


def test_a_wrong_address_is_one_line_within_seconds(tiny_blip_dir, sweep_pairs, tmp_path):
    pairs_file = write_pairs(sweep_pairs[:1], tmp_path / "pairs.parquet")
    result = subprocess.run([sys.executable, "-m", "notice.cli", "patch", str(pairs_file), "--model",
                             str(tiny_blip_dir), "--out", str(tmp_path / "out"), "--workers", "2",
                             "--ray-address", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Ray cluster answers there" in lines[0] and "127.0.0.1:9" in lines[0]
    assert not (tmp_path / "out").exists()
