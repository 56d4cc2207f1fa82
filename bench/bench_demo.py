"""The demo's wall time after the install: `notice demo` of this checkout against a baseline checkout,
runs interleaved in one session (never a test).

Besides wall time it records each run's CPU time (user + system of the demo process): with one thread
that is about the wall time the demo needs on cores of its own, which a shared machine cannot show.

Each run starts a fresh process on an empty run folder, one torch thread, as `make demo` does on an
installed checkout. The baseline is another source tree (e.g. `git archive main src | tar -x -C DIR`)
run by the same interpreter. Usage:

    python bench/bench_demo.py --baseline DIR/src --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(src: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `notice demo` with `src` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "notice.cli", "demo", "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def kept_per_condition(out: Path) -> dict[str, int]:
    """Selected pairs per (family, task, corruption), from the selection reports of a demo folder."""
    kept = {}
    for report in sorted(out.glob("*/selected/*.selection.json")):
        for corruption, counts in json.loads(report.read_text())["by_corruption"].items():
            kept[f"{report.parts[-3]} {report.name.split('.')[0]} {corruption}"] = counts["kept"]
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline's src folder")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    names = ("baseline", "this checkout")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    kept: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            for name, src in zip(names, (args.baseline, ROOT / "src")):
                out = Path(folder) / f"{name.replace(' ', '-')}-{run}"
                seconds, cpu_seconds = run_demo(src, out)
                wall[name].append(round(seconds, 1))
                cpu[name].append(round(cpu_seconds, 1))
                kept[name] = kept_per_condition(out)
                print(f"{name} run {run + 1}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", flush=True)
    medians = {kind: {name: statistics.median(values) for name, values in runs.items()}
               for kind, runs in (("wall_s", wall), ("cpu_s", cpu))}
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "load_average": os.getloadavg(), "wall_s": wall, "cpu_s": cpu, "median": medians,
                      "ratio": {kind: round(m["this checkout"] / m["baseline"], 2) for kind, m in medians.items()},
                      "kept_pairs": kept}, indent=2))


if __name__ == "__main__":
    main()
