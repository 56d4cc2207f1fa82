"""The report's wall time on a finished demo run folder: `make_report` of this checkout against a
baseline checkout, runs interleaved in one session (never a test), and whether their tables agree.

Each run is a fresh process with one torch thread that loads every model's tables (not timed) and
then times `make_report` alone: wall time, and CPU time (user + system, its drawing processes
included), which a shared machine disturbs less. The baseline is another source tree (e.g. `git archive main src | tar
-x -C DIR`) run by the same interpreter. The tables (CSV) both write must be equal, byte for byte;
tables only this checkout writes are listed. Usage:

    python bench/report_speed.py DEMO_FOLDER --baseline DIR/src --runs 3 [--again blip]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run(folder: Path):
    """One family's part of the report from its run folder (as `notice demo` hands it over); pairs
    whose files sit under the folder the run was written to are moved to where it is now."""
    from notice.analysis.head_functions import read_head_functions
    from notice.pairs import read_pairs
    from notice.report.build import ModelResults, _selection_reports
    from notice.store import load_results

    config = json.loads((folder / "config.json").read_text())
    written = str(config["out"])

    def moved(path: str) -> str:
        return str(folder) + path[len(written):] if path.startswith(written) else path

    pairs_files = {}
    for path in sorted((folder / "selected").glob("*.parquet")):
        pairs_files[path] = [dataclasses.replace(
            p, clean_image=moved(p.clean_image), corrupt_image=moved(p.corrupt_image),
            metadata={k: moved(v) if k.endswith("_mask") and isinstance(v, str) else v for k, v in p.metadata.items()})
            for p in read_pairs(path)]
    pairs = [p for file_pairs in pairs_files.values() for p in file_pairs]
    return ModelResults(config["model"], load_results(folder / "results"), read_head_functions(folder / "head_functions"),
                        pairs, _selection_reports(pairs_files))


def worker(demo: Path, out: Path, again: str | None) -> None:
    import torch

    from notice.report.build import make_report

    torch.set_num_threads(1)
    models = [load_run(config.parent) for config in sorted(demo.glob("*/config.json"))]
    if again:  # a stand-in for one more family: that run's tables once more under another name
        models.append(dataclasses.replace(load_run(demo / again), name=f"{again}-again"))
    started, cpu = time.perf_counter(), _cpu_seconds()
    make_report(models, out, "notice demo", seed=0)
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu}))


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the report's drawing processes)."""
    return sum(getattr(resource.getrusage(who), kind) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for kind in ("ru_utime", "ru_stime"))


def timed(src: Path, demo: Path, out: Path, again: str | None) -> tuple[float, float]:
    """Wall and CPU seconds of one `make_report` with `src` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, str(demo), "--worker", str(out)]
                          + (["--again", again] if again else []), env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["cpu_seconds"])


def compare_tables(baseline: Path, this: Path) -> dict[str, list[str]]:
    """Tables equal byte for byte, different, and written by this checkout only."""
    theirs = {p.name for p in (baseline / "tables").glob("*.csv")}
    ours = {p.name for p in (this / "tables").glob("*.csv")}
    shared = sorted(theirs & ours)
    return {"equal": [n for n in shared if (baseline / "tables" / n).read_bytes() == (this / "tables" / n).read_bytes()],
            "different": [n for n in shared
                          if (baseline / "tables" / n).read_bytes() != (this / "tables" / n).read_bytes()],
            "new": sorted(ours - theirs), "missing": sorted(theirs - ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a finished `notice demo` folder (one run folder per family)")
    parser.add_argument("--baseline", type=Path, help="the baseline's src folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--again", help="a family's run folder (e.g. blip) reported once more under another name: "
                                            "a stand-in for a third family of the same size")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.demo, args.worker, args.again)
    if args.baseline is None:
        parser.error("--baseline DIR/src is required")
    names = ("baseline", "this checkout")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        demo = Path(folder) / "demo"
        shutil.copytree(args.demo, demo, ignore=shutil.ignore_patterns("report"))
        for run in range(args.runs):
            for name, src in zip(names, (args.baseline, ROOT / "src")):
                out = Path(folder) / f"{name.replace(' ', '-')}-{run}"
                wall, cpu_seconds = timed(src, demo, out, args.again)
                seconds[name].append(round(wall, 2))
                cpu[name].append(round(cpu_seconds, 2))
                print(f"{name} run {run + 1}: {wall:.2f} s wall, {cpu_seconds:.2f} s CPU", flush=True)
        tables = compare_tables(Path(folder) / "baseline-0", Path(folder) / "this-checkout-0")
    medians = {kind: {name: statistics.median(values) for name, values in runs.items()}
               for kind, runs in (("wall_s", seconds), ("cpu_s", cpu))}
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "load_average": os.getloadavg(), "wall_s": seconds, "cpu_s": cpu, "median": medians,
                      "ratio": {kind: round(m["this checkout"] / m["baseline"], 2) for kind, m in medians.items()},
                      "tables": tables}, indent=2))


if __name__ == "__main__":
    main()
