"""The demo's wall time after the install: `notice demo` of this checkout against a baseline checkout,
runs interleaved in one session (never a test).

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(src: Path, out: Path) -> float:
    """Wall seconds of one `notice demo` with `src` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "notice.cli", "demo", "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


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
    times: dict[str, list[float]] = {"this checkout": [], "baseline": []}
    kept: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            for name, src in (("baseline", args.baseline), ("this checkout", ROOT / "src")):
                out = Path(folder) / f"{name.replace(' ', '-')}-{run}"
                times[name].append(run_demo(src, out))
                kept[name] = kept_per_condition(out)
                print(f"{name} run {run + 1}: {times[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "load_average": os.getloadavg(), "runs_s": times, "median_s": medians,
                      "ratio": round(medians["this checkout"] / medians["baseline"], 2),
                      "kept_pairs": kept}, indent=2))


if __name__ == "__main__":
    main()
