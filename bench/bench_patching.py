"""Three ways to run one activation-patching sweep, timed in one run (never a test).

  (a) research code: per cell, the processor and the whole model on a batch of 3 (clean, corrupt,
      patched), a hook copying the clean row's activation into the patched row;
  (b) TransformerLens way: clean activations cached once, then per cell one full forward of the
      receiving (corrupt) run with a hook;
  (c) notice's engine (patching/engine.py), sanity checks included.

The sweep: every text-encoder module (layer, self_attn, cross_attn, mlp) and every cross-attention
head at every question token, image corruption (SMP), denoising. (a) and (b) are timed on a seeded
random subset of the cells and extrapolated to the whole sweep ((b)'s one caching forward counted
once). Peak memory is the resident-set growth during a method (CPU, sampled every 2 ms) or the peak
CUDA allocation, above the level before it. Usage:

    python bench/bench_patching.py                 # both architectures, the BENCHMARKS.md numbers
    python bench/bench_patching.py --quick         # seconds: a smoke check
    python bench/bench_patching.py --device cuda --arch full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import helpers  # noqa: E402  (builders of random-init BLIP checkpoints)
from notice.models.base import Run  # noqa: E402
from notice.models.blip import BlipAdapter  # noqa: E402
from notice.pairs import Pair  # noqa: E402
from notice.patching.engine import patch_pair  # noqa: E402
from notice.patching.inputs import pair_runs  # noqa: E402
from notice.patching.naive import hooked, patched_logits, record  # noqa: E402
from notice.patching.sites import expand_sites  # noqa: E402

QUESTION = "is the shape red or blue?"  # 9 tokens with [CLS] and [SEP] in both vocabularies
MODULE_SITES = ["text.*.layer", "text.*.self_attn", "text.*.cross_attn", "text.*.mlp"]
HEAD_SITES = ["text.*.cross_attn.head*"]


class PeakMemory:
    """Peak memory during a block: the process's resident set (CPU, sampled; `peak` absolute, model
    included, `growth` above the level at entry), or CUDA allocations (`peak`, `growth` likewise)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.peak = self.base
        else:
            self.base = self.peak = self._rss()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(arch: str, folder: Path, device: str, dtype: torch.dtype) -> BlipAdapter:
    if arch == "embedded":
        adapter = helpers.easyvqa_arch_blip(folder)
    else:
        spec = helpers.FULL_BLIP
        adapter = BlipAdapter(helpers.blip_model(spec), helpers.blip_processor(spec["image_size"]), "blip-vqa-base arch")
    adapter.model.to(device, dtype)
    return adapter


def make_pair(adapter: BlipAdapter, folder: Path) -> Pair:
    size = adapter.processor.image_processor.size["height"]
    red, blue = folder / "red.png", folder / "blue.png"
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    helpers.shape_image(size, (255, 0, 0), box=box).save(red)
    helpers.shape_image(size, (0, 0, 255), box=box).save(blue)
    assert adapter.token_length(QUESTION) == 9
    return Pair("bench", "colors", "image_smp", str(red), str(blue), QUESTION, QUESTION, "red", "blue")


@torch.no_grad()
def research_way(adapter: BlipAdapter, pair: Pair, cells, device: str) -> None:
    """(a): processor + whole model on [clean, corrupt, patched] for every cell."""
    from notice.io import load_image

    clean, corrupt = load_image(pair.clean_image), load_image(pair.corrupt_image)
    for site in cells:
        inputs = adapter.prepare([clean, corrupt, corrupt], [pair.clean_prompt] * 3)
        rows = slice(None) if site.position == "all" else slice(int(site.position), int(site.position) + 1)
        columns = adapter.site_columns(site) or slice(None)

        def copy_clean_into_patched(t, rows=rows, columns=columns):
            t = t.clone()
            t[2, rows, columns] = t[0, rows, columns]
            return t

        with hooked(adapter, site, copy_clean_into_patched, Run(inputs)):
            logits = adapter.run_logits(Run(inputs))
        logits[2].max().item()  # the research code reads each cell's result on the host
    sync(device)


@torch.no_grad()
def cached_loop(adapter: BlipAdapter, pair: Pair, cells, device: str, setup: list[float]) -> None:
    """(b): clean activations cached once (timed apart, into `setup`); one full receiving-run forward per cell."""
    start = time.perf_counter()
    clean, corrupt = pair_runs(adapter, pair)
    values = record(adapter, clean, cells)
    sync(device)
    setup.append(time.perf_counter() - start)
    for site in cells:
        patched_logits(adapter, corrupt, site, values[site.module])[0].max().item()
    sync(device)


def engine_way(adapter: BlipAdapter, pair: Pair, sites, device: str, max_memory: str) -> None:
    patch_pair(adapter, pair, sites, max_memory=max_memory)
    sync(device)


def timed(fn, repeats: int, device: str):
    times, peak = [], (0, 0)
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peak = max(peak[0], memory.peak), max(peak[1], memory.growth)
    return statistics.median(times), times, peak


def matmul_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        runs.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(runs) / 1e9


def engine_flops(adapter, pair, sites, max_memory) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        patch_pair(adapter, pair, sites, max_memory=max_memory)
    return counter.get_total_flops()


def bench_arch(arch: str, args, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        adapter = build(arch, Path(tmp), args.device, dtype)
        pair = make_pair(adapter, Path(tmp))
        positions = adapter.num_positions(pair_runs(adapter, pair)[0])
        sites = MODULE_SITES + HEAD_SITES
        cells = expand_sites(sites, adapter.streams, positions)
        heads = expand_sites(HEAD_SITES, adapter.streams, positions)
        subset = random.Random(args.seed).sample(cells, min(args.sample, len(cells)))
        engine_way(adapter, pair, sites[:1], args.device, args.max_memory)  # warm-up
        research_way(adapter, pair, subset[:1], args.device)
        result = {"arch": arch, "cells": len(cells), "head_cells": len(heads), "sampled_cells": len(subset)}
        a, a_runs, a_peak = timed(lambda: research_way(adapter, pair, subset, args.device), args.repeats, args.device)
        setup: list[float] = []
        b, b_runs, b_peak = timed(lambda: cached_loop(adapter, pair, subset, args.device, setup), args.repeats,
                                  args.device)
        b_setup = statistics.median(setup)
        c, c_runs, c_peak = timed(lambda: engine_way(adapter, pair, sites, args.device, args.max_memory),
                                  args.repeats, args.device)
        h, h_runs, _ = timed(lambda: engine_way(adapter, pair, HEAD_SITES, args.device, args.max_memory),
                             args.repeats, args.device)
        flops = engine_flops(adapter, pair, sites, args.max_memory)
        # (b)'s one-time caching forward is counted once per sweep, not once per sampled cell
        a_cell, c_cell = a / len(subset), c / len(cells)
        b_cell = (b_setup + (b - b_setup) / len(subset) * len(cells)) / len(cells)
        result.update({
            "research_s_per_cell": a_cell, "cached_loop_s_per_cell": b_cell, "engine_s_per_cell": c_cell,
            "research_cells_per_s": 1 / a_cell, "cached_loop_cells_per_s": 1 / b_cell, "engine_cells_per_s": 1 / c_cell,
            "engine_vs_research": a_cell / c_cell, "engine_vs_cached_loop": b_cell / c_cell,
            "engine_sweep_s": c, "engine_head_sweep_s": h,
            "research_sweep_s_extrapolated": a_cell * len(cells), "cached_loop_sweep_s_extrapolated": b_cell * len(cells),
            "peak_mb": {"research": a_peak[0] / 2**20, "cached_loop": b_peak[0] / 2**20, "engine": c_peak[0] / 2**20},
            "growth_mb": {"research": a_peak[1] / 2**20, "cached_loop": b_peak[1] / 2**20,
                          "engine": c_peak[1] / 2**20},
            "engine_gflop": flops / 1e9, "engine_gflops_per_s": flops / c / 1e9,
            "runs_s": {"research": a_runs, "cached_loop": b_runs, "engine": c_runs, "engine_heads": h_runs},
        })
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["embedded", "full", "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; medians are reported")
    parser.add_argument("--sample", type=int, default=12, help="cells timed for (a) and (b), then extrapolated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-memory", default="8GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="embedded architecture, 1 repeat, 3 sampled cells")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.repeats, args.sample = "embedded", 1, 3
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "dtype": args.dtype,
               "matmul_gflops_per_s": matmul_gflops(args.device, dtype)}
    print(json.dumps({"machine": machine}), flush=True)
    results = []
    for arch in (["embedded", "full"] if args.arch == "both" else [args.arch]):
        results.append(bench_arch(arch, args, dtype))
        r = results[-1]
        print(f"\n{arch}: {r['cells']} cells ({r['head_cells']} head cells); (a)/(b) timed on {r['sampled_cells']}")
        for name, key in (("(a) research", "research"), ("(b) cached loop", "cached_loop"), ("(c) engine", "engine")):
            print(f"  {name:16s} {r[key + '_cells_per_s']:9.2f} cells/s  {1000 * r[key + '_s_per_cell']:9.2f} ms/cell"
                  f"  peak {r['peak_mb'][key]:7.0f} MB (+{r['growth_mb'][key]:.0f} MB)")
        print(f"  engine {r['engine_vs_research']:.0f}x (a), {r['engine_vs_cached_loop']:.0f}x (b); "
              f"sweep {r['engine_sweep_s']:.1f} s, head sweep {r['engine_head_sweep_s']:.1f} s; "
              f"{r['engine_gflops_per_s']:.1f} GFLOP/s of {machine['matmul_gflops_per_s']:.1f} (dense matmul)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
