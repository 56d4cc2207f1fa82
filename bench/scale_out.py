"""Pairs per second of the demo's BLIP sweep in one process and on 1 and 2 Ray workers (never a test).

The pairs: easy-VQA colour and shape pairs of the test split (SMP, STR and noise), selected by the
embedded BLIP; the sites: the demo's (every text-encoder module and cross-attention head at every
token). Each way runs the whole sweep into a fresh results folder, one torch thread per process,
interleaved over the repeats. "sweep" time starts when the workers are up and the cells counted
(Ray) or when the model is loaded (one process); "total" includes the actors' start and model
loads. Usage:

    python bench/scale_out.py [--pairs 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from notice.executors.ray import patch_pairs_on_ray  # noqa: E402
from notice.models import load_model  # noqa: E402
from notice.pairs import read_pairs  # noqa: E402
from notice.patching.engine import patch_pairs  # noqa: E402
from notice.pipeline import DEFAULT_SITES  # noqa: E402
from notice.select import select_pairs  # noqa: E402
from notice.tasks import build_pairs  # noqa: E402

MODEL = "easyvqa-blip"


def demo_pairs(folder: Path, count: int) -> list:
    adapter = load_model(MODEL)
    pairs = []
    for task in ("easyvqa-color", "easyvqa-shape"):
        build_pairs(task, folder / f"{task}.parquet", adapter.tokenizer, split="test", limit=count)
        pairs += select_pairs(adapter, read_pairs(folder / f"{task}.parquet"), balance=False).kept
    if len(pairs) < count:
        raise SystemExit(f"only {len(pairs)} pairs were selected; raise --pairs' source limit")
    return pairs[:count]


def one_process(pairs, out: Path) -> dict:
    started = time.perf_counter()
    adapter = load_model(MODEL)
    loaded = time.perf_counter()
    patch_pairs(adapter, pairs, list(DEFAULT_SITES), out, model_name=MODEL)
    done = time.perf_counter()
    return {"total_s": done - started, "sweep_s": done - loaded}


def on_ray(pairs, out: Path, workers: int) -> dict:
    clock: dict[str, float] = {"started": time.perf_counter()}
    patch_pairs_on_ray(MODEL, pairs, list(DEFAULT_SITES), out, workers=workers, threads=1,
                       on_total=lambda _cells: clock.__setitem__("ready", time.perf_counter()))
    done = time.perf_counter()
    return {"total_s": done - clock["started"], "sweep_s": done - clock["ready"]}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs: dict[str, list[dict]] = {"one process": [], "ray, 1 worker": [], "ray, 2 workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = demo_pairs(Path(tmp) / "pairs", args.pairs)
        for repeat in range(args.repeats):
            runs["one process"].append(one_process(pairs, Path(tmp) / f"local-{repeat}"))
            runs["ray, 1 worker"].append(on_ray(pairs, Path(tmp) / f"ray1-{repeat}", 1))
            runs["ray, 2 workers"].append(on_ray(pairs, Path(tmp) / f"ray2-{repeat}", 2))
            print(json.dumps({name: done[-1] for name, done in runs.items()}), flush=True)
    ray.shutdown()
    result = {"pairs": len(pairs), "cores": os.cpu_count(), "load_average": os.getloadavg(), "ways": {}}
    for name, done in runs.items():
        sweep = statistics.median(r["sweep_s"] for r in done)
        result["ways"][name] = {"sweep_s": sweep, "total_s": statistics.median(r["total_s"] for r in done),
                                "pairs_per_s": len(pairs) / sweep, "runs": done}
    ways = result["ways"]
    result["speedup_2_vs_1_worker"] = ways["ray, 2 workers"]["pairs_per_s"] / ways["ray, 1 worker"]["pairs_per_s"]
    result["ray_overhead_s_per_pair"] = (ways["ray, 1 worker"]["sweep_s"] - ways["one process"]["sweep_s"]) / len(pairs)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
