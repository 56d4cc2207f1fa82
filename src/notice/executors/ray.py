"""A sweep on Ray: one stateful actor per worker, one pair (with all its sites) per task.

Each actor loads the model once and patches whole pairs, so a pair's clean and corrupt traces and
its prefix reuse stay in one process; it writes the pair's shard itself with the results store's
atomic write, so the store, its run.json and its resume rule are those of a one-process sweep.
The driver skips pairs already done, hands out the rest (`dispatch.py`: a lost worker's pair is
retried on a fresh actor a bounded number of times, then reported failed by id), feeds one progress
bar from the actors' results, and on Ctrl-C stops the actors and leaves the store resumable.

Ray is an optional dependency (`pip install 'notice[ray]'`), imported only here.
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from notice.errors import NoticeError
from notice.executors.dispatch import WorkerLost, dispatch
from notice.pairs import Pair

CONNECT_TIMEOUT_S = 3.0
MAX_RETRIES = 2  # a pair whose worker died is tried on this many fresh workers before it is reported failed


def _ray():
    try:
        import ray
    except ImportError as error:
        raise NoticeError("--workers needs Ray, which is not installed: pip install 'notice[ray]'") from error
    return ray


def connect(address: str | None, workers: int, device: str) -> bool:
    """Join the cluster at `address` (host:port, ray://host:port or auto), or start a local one sized
    for `workers`; a wrong address is one line within seconds, not a long retry. True when this call
    started or joined it (and the sweep should let go of it), False when Ray was already running."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address not in (None, "auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            raise NoticeError(f"--ray-address {address}: no Ray cluster answers there ({error.__class__.__name__}); "
                              "give the head node's host:port (ray status prints it) or leave it out for a local "
                              "cluster") from error
    try:
        if address is None:
            gpus = _cuda_count() if device.startswith("cuda") else 0
            ray.init(num_cpus=os.cpu_count() or workers, num_gpus=gpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise NoticeError(f"--ray-address {address}: cannot join the Ray cluster: {str(error).splitlines()[0]}") from error
    return True


@contextmanager
def cluster(address: str | None, workers: int, device: str) -> Iterator[Any]:
    """Ray, connected for one sweep; a cluster this sweep started or joined is let go afterwards."""
    ray = _ray()
    joined = connect(address, workers, device)
    try:
        yield ray
    finally:
        if joined:
            ray.shutdown()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


class PatchWorker:
    """The actor: one model, loaded once; one pair at a time, its shard written here."""

    def __init__(self, model: str, device: str, dtype: str, threads: int, store: dict[str, Any]):
        import torch

        from notice.models import load_model
        from notice.store import ResultStore

        torch.set_num_threads(threads)
        self.adapter = load_model(model, device=device, dtype=dtype)
        self.model_name = model
        self.store = ResultStore(store["folder"], store["manifest"])

    def pid(self) -> int:
        return os.getpid()

    def sees(self, path: str) -> bool:
        return Path(path).is_file()

    def count_cells(self, pairs: Sequence[Pair], sites: Sequence[str]) -> list[int]:
        """Checks every pair is readable (before any shard is written) and counts its cells."""
        from notice.checks import prompts_fit
        from notice.patching.engine import count_cells

        prompts_fit(self.adapter, pairs)
        return count_cells(self.adapter, pairs, sites)

    def patch(self, pair: Pair, sites: Sequence[str], direction: str, options: dict[str, Any]) -> int:
        from notice.patching.attribution import pair_results

        frame = pair_results(self.adapter, pair, sites, direction, model_name=self.model_name, **options)
        self.store.write(pair.id, frame)
        return len(frame)


def patch_pairs_on_ray(model: str, pairs: Sequence[Pair], sites: Sequence[str], out, direction: str = "denoise", *,
                       workers: int, address: str | None = None, device: str = "cpu", dtype: str = "float32",
                       max_memory: str | int = "4GB", batch_size: int | None = None, checks: bool = True,
                       provenance: dict | None = None, on_total: Callable[[int], None] | None = None,
                       progress: Callable[[int, bool], None] | None = None,
                       on_pair: Callable[[], None] | None = None, max_retries: int = MAX_RETRIES,
                       on_start: Callable[[list], None] | None = None, threads: int | None = None,
                       method: str = "exact", verify_top: int | None = None) -> dict:
    """The resumable sweep of `engine.patch_pairs`, with pairs spread over `workers` Ray actors, each with
    `threads` torch threads (default: the cluster's CPUs split between them).

    Returns {"pairs", "done", "skipped", "cells", "failed" (ids), "retried"}. `on_total(cells)` gives the
    sweep's size once counted, `progress(cells, skipped)` and `on_pair()` report each finished pair,
    `on_start(actors)` hands over the actors (tests use it to kill one mid-sweep)."""
    from notice.patching.inputs import check_direction
    from notice.store import ResultStore

    check_direction(direction)
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise NoticeError(f"pair id {next(i for i in ids if ids.count(i) > 1)!r} occurs more than once: "
                          "pair ids must be unique")
    with cluster(address, workers, device) as ray:
        manifest = {"model": model, "sites": list(sites), "direction": direction, "dtype": dtype,
                    "answer_scoring": "first_token", "method": method, "verify_top": verify_top, **(provenance or {})}
        store = ResultStore(out, manifest)  # refuses a folder of another sweep before any actor starts
        gpu = device.startswith("cuda")
        cpus = threads or max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
        actor_class = ray.remote(num_cpus=1 if gpu else cpus, num_gpus=1 if gpu else 0, max_restarts=0)(PatchWorker)
        arguments = (model, device, dtype, cpus, {"folder": str(out), "manifest": manifest})

        def start():
            return actor_class.remote(*arguments)

        actors = [start() for _ in range(workers)]
        try:
            _check_shared(ray, actors, Path(out))
            try:
                counts = _get(ray, actors[0].count_cells.remote(list(pairs), list(sites)))
            except WorkerLost as error:  # its constructor failed: the model could not be loaded there
                raise NoticeError(f"a Ray worker could not start with model {model!r}: {error}") from error
            if on_total is not None:
                on_total(sum(counts))
            todo, summary = [], {"pairs": len(pairs), "done": 0, "skipped": 0, "cells": sum(counts), "retried": 0}
            for pair, count in zip(pairs, counts):
                if store.done(pair.id):  # skipped before dispatch
                    summary["skipped"] += 1
                    if progress is not None:
                        progress(count, True)
                else:
                    todo.append(pair)
            if on_start is not None:
                on_start(actors)
            options = {"method": method, "verify_top": verify_top, "max_memory": max_memory, "batch_size": batch_size,
                       "checks": checks}

            def finished(pair: Pair, cells: int) -> None:
                if on_pair is not None:
                    on_pair()
                if progress is not None:
                    progress(cells, False)

            outcome = dispatch(todo, actors, submit=lambda actor, pair: actor.patch.remote(pair, list(sites), direction,
                                                                                           options),
                               wait_one=lambda refs: ray.wait(refs, num_returns=1)[0][0],
                               result=lambda ref: _get(ray, ref), replace=lambda _lost: _fresh(actors, start, _lost),
                               max_retries=max_retries, on_done=finished)
        finally:
            for actor in actors:
                ray.kill(actor)
        summary.update(done=len(outcome.done), failed=[p.id for p in outcome.failed], retried=outcome.retried)
        return summary


def _fresh(actors: list, start: Callable[[], Any], lost: Any) -> Any:
    """A new actor in the place of a lost one (so the final clean-up stops it too)."""
    actors[actors.index(lost)] = fresh = start()
    return fresh


def _get(ray, ref):
    """A task's result; a dead actor is WorkerLost, an error raised in the task is raised here as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as error:
        raise WorkerLost(str(error).splitlines()[0]) from error
    except ray.exceptions.RayTaskError as error:
        cause = error.as_instanceof_cause()
        if isinstance(cause, NoticeError):
            raise NoticeError(str(error.cause)) from error
        raise cause from error


def _check_shared(ray, actors: list, out: Path) -> None:
    """On a cluster of several nodes, every worker must see the output folder the driver sees (a shared
    file system): a marker the driver writes beside it must be visible to each actor."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    anchor = next(folder for folder in (out, *out.parents) if folder.is_dir())
    marker = anchor / f".notice-shared-{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        seen = _get(ray, [actor.sees.remote(str(marker)) for actor in actors]) if actors else []
    finally:
        marker.unlink(missing_ok=True)
    require_shared(out, seen, len(nodes))


def require_shared(out: Path, seen: Sequence[bool], nodes: int) -> None:
    if not all(seen):
        raise NoticeError(f"--out {out} is not on a file system every worker sees ({seen.count(False)} of "
                          f"{len(seen)} workers on this {nodes}-node cluster cannot see it): put it on a shared "
                          "file system (NFS, Lustre, a mounted bucket) mounted at the same path on every node")
