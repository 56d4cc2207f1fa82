"""Hand pairs to workers, one pair at a time each, and retry the pairs a lost worker held.

Kept apart from Ray so its bookkeeping (what is in flight, how often each pair was tried, when a
pair is given up on) is plain code, tested without a cluster. A worker that dies takes its pair in
flight with it; the pair goes back to the front of the queue for another worker, up to
`max_retries` times, and is then reported as failed by id, never dropped silently.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

W = TypeVar("W")  # a worker
H = TypeVar("H", bound=Hashable)  # a handle on one pair's work in flight
P = TypeVar("P")  # a pair


class WorkerLost(Exception):
    """The worker holding a pair died (killed, out of memory, its node lost)."""


@dataclass
class Outcome(Generic[P]):
    done: list[P] = field(default_factory=list)
    failed: list[P] = field(default_factory=list)
    retried: int = 0  # pairs handed out again after their worker was lost


def dispatch(pairs: Sequence[P], workers: list[W], submit: Callable[[W, P], H],
             wait_one: Callable[[list[H]], H], result: Callable[[H], int], replace: Callable[[W], W],
             max_retries: int = 2, on_done: Callable[[P, int], None] | None = None) -> Outcome[P]:
    """Run every pair on some worker. `submit` starts a pair and returns its handle; `wait_one` blocks
    until one handle is ready; `result` gives its cell count or raises WorkerLost; `replace` gives a fresh
    worker for a lost one. Other exceptions (bad input, a failed sanity check) stop the sweep as they
    would in one process."""
    queue: deque[P] = deque(pairs)
    tries: Counter[int] = Counter()
    idle = list(workers)
    in_flight: dict[H, tuple[W, P]] = {}
    outcome: Outcome[P] = Outcome()
    while queue or in_flight:
        while queue and idle:
            worker, pair = idle.pop(), queue.popleft()
            in_flight[submit(worker, pair)] = (worker, pair)
        handle = wait_one(list(in_flight))
        worker, pair = in_flight.pop(handle)
        try:
            cells = result(handle)
        except WorkerLost:
            tries[id(pair)] += 1
            idle.append(replace(worker))
            if tries[id(pair)] > max_retries:
                outcome.failed.append(pair)
            else:
                outcome.retried += 1
                queue.appendleft(pair)
            continue
        idle.append(worker)
        outcome.done.append(pair)
        if on_done is not None:
            on_done(pair, cells)
    return outcome
