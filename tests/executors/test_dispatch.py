"""The dispatch bookkeeping, without a cluster: lost workers' pairs are retried, then reported failed."""

from __future__ import annotations

import itertools

import pytest

from notice.executors.dispatch import WorkerLost, dispatch
from notice.executors.ray import require_shared
from notice.errors import NoticeError


class FakeCluster:
    """Workers are numbers; a handle is (worker, pair); `deadly` pairs kill the worker that runs them
    `times` times (all of them when None)."""

    def __init__(self, deadly: dict[str, int | None]):
        self.deadly, self.runs, self.started = dict(deadly), [], itertools.count(100)

    def submit(self, worker, pair):
        self.runs.append((worker, pair))
        return (worker, pair)

    def result(self, handle):
        _, pair = handle
        if pair in self.deadly and self.deadly[pair] != 0:
            self.deadly[pair] = None if self.deadly[pair] is None else self.deadly[pair] - 1
            raise WorkerLost(f"worker died on {pair}")
        return 10

    def replace(self, worker):
        return next(self.started)


def run(pairs, deadly, workers=2, max_retries=2):
    cluster = FakeCluster(deadly)
    finished = []
    outcome = dispatch(pairs, list(range(workers)), cluster.submit, lambda handles: handles[0], cluster.result,
                       cluster.replace, max_retries, on_done=lambda pair, cells: finished.append(pair))
    return outcome, finished, cluster


def test_every_pair_runs_once_when_no_worker_dies():
    outcome, finished, cluster = run(list("abcde"), {})
    assert sorted(outcome.done) == sorted(finished) == list("abcde") and not outcome.failed
    assert len(cluster.runs) == 5 and {worker for worker, _ in cluster.runs} == {0, 1}


def test_a_lost_workers_pair_is_retried_on_a_fresh_worker():
    outcome, _, cluster = run(list("abcd"), {"b": 1})
    assert sorted(outcome.done) == list("abcd") and outcome.retried == 1 and not outcome.failed
    tries = [worker for worker, pair in cluster.runs if pair == "b"]
    assert len(tries) == 2 and tries[1] >= 100  # the second try ran on a replacement


def test_a_pair_that_kills_every_worker_is_reported_failed_after_the_retries():
    outcome, finished, cluster = run(list("abc"), {"c": None}, max_retries=2)
    assert outcome.failed == ["c"] and sorted(outcome.done) == ["a", "b"] == sorted(finished)
    assert [pair for _, pair in cluster.runs].count("c") == 3  # the first try and two retries


def test_errors_other_than_a_lost_worker_stop_the_sweep():
    def broken(handle):
        raise NoticeError("pair b: image not found")

    with pytest.raises(NoticeError, match="image not found"):
        dispatch(["a", "b"], [0], lambda w, p: (w, p), lambda hs: hs[0], broken, lambda w: w)


def test_a_folder_some_worker_cannot_see_is_refused(tmp_path):
    require_shared(tmp_path, [True, True], nodes=2)
    with pytest.raises(NoticeError, match="1 of 2 workers on this 2-node cluster cannot see it") as info:
        require_shared(tmp_path, [True, False], nodes=2)
    assert "\n" not in str(info.value)


def test_run_configs_name_the_ray_executor_under_patch():
    from notice.pipeline import config_from_dict

    raw = {"out": "run", "tasks": ["easyvqa-color"], "patch": {"executor": "ray", "workers": 2, "address": "auto"}}
    config = config_from_dict(raw, "c.yaml")
    assert (config.executor, config.workers, config.address) == ("ray", 2, "auto")
    assert config_from_dict({"out": "run", "tasks": ["easyvqa-color"]}, "c.yaml").executor == "local"
    with pytest.raises(NoticeError, match="executor") as info:
        config_from_dict(dict(raw, patch={"executor": "slurm"}), "c.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(NoticeError, match="workers"):
        config_from_dict(dict(raw, patch={"executor": "ray", "workers": 0}), "c.yaml")
