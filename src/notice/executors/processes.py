"""Several models' pipelines side by side, one process each (what `notice demo` runs): each worker runs
`pipeline.run_steps` with one share of the cores as torch threads, and its bars and lines are relayed to
the parent's one display."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Sequence

from notice.pipeline import RunConfig, progress_bars, run_steps


def run_models(configs: Sequence[RunConfig], console, processes: int | None = None) -> list:
    """run_steps of every config, in order. With several processes (default: one per config where there are
    several cores) the models run side by side, the cores shared out as torch threads (at least one each:
    three models on two cores finish together rather than one after two); their progress shows here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = min(len(configs), processes or (len(configs) if cores > 1 else 1))
    if processes <= 1:
        return [run_steps(config, console) for config in configs]
    context = multiprocessing.get_context("spawn")  # torch in a forked child can deadlock on its thread pools
    messages = context.Queue()
    with progress_bars(console) as progress:
        relay = threading.Thread(target=_show_relayed, args=(messages, progress), daemon=True)
        relay.start()
        try:
            with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                                     initargs=(messages, max(1, cores // processes))) as pool:
                futures = [pool.submit(_run_steps_in_worker, config) for config in configs]
                return [future.result() for future in futures]
        finally:
            messages.put(None)
            relay.join()


class RelayedProgress:
    """What run_steps asks of a progress display and a console, in a worker process: each call goes to the
    parent over a queue, where `_show_relayed` draws it, bars labelled with the model."""

    def __init__(self, messages, label: str):
        self.messages, self.label, self.count = messages, label, 0

    def __enter__(self) -> "RelayedProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        self.count += 1
        self.messages.put(("add", (self.label, self.count), f"{self.label} {description}", total))
        return self.count

    def advance(self, task: int, advance: float = 1) -> None:
        self.messages.put(("advance", (self.label, task), advance))

    def update(self, task: int, advance: float = 0, **_) -> None:
        self.advance(task, advance)

    def print(self, text: str) -> None:
        self.messages.put(("print", text))


def _show_relayed(messages, progress) -> None:
    bars: dict[tuple[str, int], Any] = {}
    while (message := messages.get()) is not None:
        kind, *rest = message
        if kind == "add":
            bars[rest[0]] = progress.add_task(rest[1], total=rest[2])
        elif kind == "advance":
            progress.advance(bars[rest[0]], rest[1])
        else:
            progress.console.print(rest[0])


_relay = None


def _start_worker(messages, threads: int) -> None:
    import torch

    global _relay
    torch.set_num_threads(threads)
    _relay = messages


def _run_steps_in_worker(config: RunConfig):
    progress = RelayedProgress(_relay, config.model)
    return run_steps(config, progress, progress)
