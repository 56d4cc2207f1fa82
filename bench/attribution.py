"""Exact patching against AtP and AtP*: cost, and agreement on trained models (never a test).

Cost, on one pair of each model: FLOPs (torch's counter, backward included) in units of one plain forward,
and seconds (median of --repeats), of exact patching, AtP and AtP* for
  (a) every text-encoder module and cross-attention head at every position of the full-size blip-vqa-base
      architecture (random init; 9 question tokens, 577 image tokens);
  (b) every language-model module and head at every position of a llava-1.5-geometry prompt (576 image
      tokens, 585 in all; the tiny LLaVA's widths and depths, random init);
  (c) the embedded trained models, easyvqa-blip and easyvqa-llava, with the same site patterns.
Agreement, on the embedded trained models over their selected easy-VQA colour and shape pairs: Spearman of
the estimate with the exact effect, the share of pairs whose exact top-20 cells are all inside the AtP*
top-100, and whether --verify-top 100 reproduces the exact top-20 (cells, and values to 1e-5). Usage:

    python bench/attribution.py [--repeats 3] [--pairs 24] [--skip-full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]

import helpers  # noqa: E402
from notice.models import load_model  # noqa: E402
from notice.models.blip import BlipAdapter  # noqa: E402
from notice.pairs import Pair, read_pairs  # noqa: E402
from notice.patching.attribution import attribute_pair, compare_tables, pair_results  # noqa: E402
from notice.patching.engine import patch_pair  # noqa: E402
from notice.patching.inputs import pair_runs  # noqa: E402
from notice.select import select_pairs  # noqa: E402
from notice.tasks import build_pairs  # noqa: E402

BLIP_SITES = ["text.*.layer", "text.*.self_attn", "text.*.cross_attn", "text.*.mlp", "text.*.cross_attn.head*"]
LLAVA_SITES = ["lm.*.layer", "lm.*.self_attn", "lm.*.mlp", "lm.*.self_attn.head*"]


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(name: str, adapter, pair: Pair, sites: list[str], repeats: int) -> dict:
    clean, _ = pair_runs(adapter, pair)
    forward = flops(lambda: adapter.run_logits(clean))
    layers = sum(adapter.streams[s].layers for s in adapter.gradient_streams)
    ways = {"exact": lambda: patch_pair(adapter, pair, sites),
            "atp": lambda: attribute_pair(adapter, pair, sites, method="atp"),
            "atp*": lambda: attribute_pair(adapter, pair, sites, method="atp*")}
    cells = len(ways["atp"]())
    out = {"model": name, "cells": cells, "forward_gflop": forward / 1e9, "graddrop_layers": layers}
    for way, fn in ways.items():
        fn()  # warm-up
        out[way] = {"forward_equivalents": flops(fn) / forward, "seconds": seconds(fn, repeats)}
    # AtP*'s work: one plain forward of the source, one differentiable forward of the receiving run and
    # 1 + layers backwards, all counted in its forward-equivalents above (the target: at most 3 forwards
    # plus one backward per GradDrop layer)
    out["atp*_backwards"] = 1 + layers
    out["exact_vs_atp*_time"] = out["exact"]["seconds"] / out["atp*"]["seconds"]
    print(json.dumps(out), flush=True)
    return out


def shape_pair(size: int, folder: Path, question: str = "is the shape red or blue?") -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    red, blue = folder / "red.png", folder / "blue.png"
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    helpers.shape_image(size, (255, 0, 0), box=box).save(red)
    helpers.shape_image(size, (0, 0, 255), box=box).save(blue)
    return Pair("bench", "colors", "image_smp", str(red), str(blue), question, question, "red", "blue")


def selected_pairs(adapter, folder: Path, count: int) -> list[Pair]:
    """Selected easy-VQA pairs of every corruption, colour and shape alike."""
    pairs = []
    for task in ("easyvqa-color", "easyvqa-shape"):
        path = folder / f"{adapter.family}-{task}.parquet"
        build_pairs(task, path, adapter.tokenizer, split="test", limit=count)
        pairs += select_pairs(adapter, read_pairs(path), balance=False).kept
    return pairs[::max(1, len(pairs) // count)][:count]


def agreement(name: str, adapter, pairs: list[Pair], sites: list[str]) -> dict:
    exact = pd.concat([patch_pair(adapter, p, sites) for p in pairs], ignore_index=True)
    out: dict = {"model": name, "pairs": len(pairs), "cells_per_pair": len(exact) // len(pairs)}
    for method in ("atp", "atp*"):
        estimated = pd.concat([attribute_pair(adapter, p, sites, method=method) for p in pairs], ignore_index=True)
        result = compare_tables(estimated, exact, k=20, k_prime=100)
        out[method] = {"spearman_median": result["spearman_median"],
                       "recall_top20_in_top100": result["recall@20in100_mean"],
                       "pairs_with_top20_inside_top100": result["pairs_with_all_inside"],
                       "largest_misses": result["largest_misses"].to_dict("records")}
    reproduced = []
    for pair in pairs:  # --verify-top 100: the exact top-20 must be among the verified rows, with equal numbers
        verified = pair_results(adapter, pair, sites, method="atp*", verify_top=100)
        verified = verified[verified["method"] == "exact"].set_index("site")["ld"]
        rows = exact[exact["pair_id"] == pair.id]
        receiving = rows["ld_corrupt"] if rows["direction"].iloc[0] == "denoise" else rows["ld_clean"]
        top = rows.loc[(rows["ld"] - receiving).abs().nlargest(20).index].set_index("site")["ld"]
        # equal up to float32 rounding: the verify run batches its 100 cells otherwise than a full sweep
        reproduced.append(bool(top.index.isin(verified.index).all()
                               and (verified.reindex(top.index) - top).abs().max() < 1e-5))
    out["verify_top100_reproduces_exact_top20"] = sum(reproduced) / len(reproduced)
    print(json.dumps({k: v for k, v in out.items()}, default=str), flush=True)
    return out


def main() -> None:
    from llava_patching import with_llava_15_geometry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=24, help="selected pairs per model for the agreement")
    parser.add_argument("--skip-full", action="store_true", help="only the embedded models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    report: dict = {"cost": [], "agreement": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        embedded = {"easyvqa-blip": (load_model("easyvqa-blip"), BLIP_SITES),
                    "easyvqa-llava": (load_model("easyvqa-llava"), LLAVA_SITES)}
        if not args.skip_full:
            spec = helpers.FULL_BLIP
            full = BlipAdapter(helpers.blip_model(spec), helpers.blip_processor(spec["image_size"]), "blip-vqa-base arch")
            report["cost"].append(cost("blip-vqa-base architecture", full,
                                       shape_pair(spec["image_size"], folder / "full"), BLIP_SITES, args.repeats))
            geometry = with_llava_15_geometry(load_model("easyvqa-llava"))
            report["cost"].append(cost("tiny LLaVA at llava-1.5 geometry", geometry, shape_pair(336, folder / "l15"),
                                       LLAVA_SITES, args.repeats))
        for name, (adapter, sites) in embedded.items():
            size = adapter.patch_grid[0] * adapter.patch_grid[2]
            report["cost"].append(cost(name, adapter, shape_pair(size, folder / name), sites, args.repeats))
            report["agreement"].append(agreement(name, adapter, selected_pairs(adapter, folder, args.pairs), sites))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
