"""Cells that change nothing: the engine with and without skipping them, in one run.

A cell whose source values equal the receiving run's where it patches cannot change the run; in a
causal LM that is every position before the first difference between the two inputs (for a text
corruption: the image tokens and the prompt up to the swapped word). The engine gives those cells
the receiving run's logits without a forward. This times one pair's sweep both ways (skipping
switched off by replacing `engine.unchanged_cells`), interleaved, median of `--repeats`, and
checks the two tables agree.

    PYTHONPATH=src python bench/unchanged_cells.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from llava_patching import with_llava_15_geometry

from notice.models import load_model
from notice.pairs import Pair
from notice.patching import engine
from notice.pipeline import DEFAULT_SITES, LLAVA_SITES
from notice.tasks import easy_vqa


def demo_like_pairs() -> dict[str, Pair]:
    """An easy-VQA test image as an image pair (SMP: another colour, same shape) and as a yes/no STR pair."""
    labels = easy_vqa.image_labels("test")
    first = labels[sorted(labels)[0]]
    other = next(l for l in (labels[i] for i in sorted(labels)) if l.color != first.color and l.shape == first.shape)
    question = "what color is the shape?"
    return {"image_smp": Pair("smp", "easyvqa-color", "image_smp", str(first.path), str(other.path), question, question,
                              first.color, other.color),
            "text_str_yesno": Pair("str", "easyvqa-color", "text_str_yesno", str(first.path), str(first.path),
                                   f"is there a {first.color} shape?", f"is there a {other.color} shape?", "yes", "no")}


def sweep(adapter, pair: Pair, sites, skip: bool):
    saved = engine.unchanged_cells
    if not skip:
        engine.unchanged_cells = lambda *args: []  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        table = engine.patch_pair(adapter, pair, sites, checks=False)
        return time.perf_counter() - started, table
    finally:
        engine.unchanged_cells = saved


def measure(adapter, sites, repeats: int) -> dict:
    out = {}
    for kind, pair in demo_like_pairs().items():
        times: dict[str, list[float]] = {"every cell": [], "skipping": []}
        tables = {}
        sweep(adapter, pair, sites, True)  # warm-up
        for _ in range(repeats):
            for name, skip in (("every cell", False), ("skipping", True)):
                seconds, tables[name] = sweep(adapter, pair, sites, skip)
                times[name].append(round(seconds, 3))
        medians = {name: statistics.median(values) for name, values in times.items()}
        clean, corrupt = engine.pair_runs(adapter, pair)
        ids = clean.inputs.input_ids[0], corrupt.inputs.input_ids[0]
        out[kind] = {"cells": len(tables["skipping"]), "positions": int(ids[0].shape[0]),
                     "first_differing_position": int((ids[0] != ids[1]).nonzero()[0, 0]) if kind.startswith("text")
                     else None,
                     "seconds": times, "median_s": medians,
                     "ratio": round(medians["every cell"] / medians["skipping"], 2),
                     "max_abs_ld_difference": float((tables["every cell"]["ld"] - tables["skipping"]["ld"]).abs().max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llava = load_model("easyvqa-llava")
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "threads": 1,
              "easyvqa-llava (demo sites)": measure(llava, LLAVA_SITES, args.repeats),
              "easyvqa-blip (demo sites)": measure(load_model("easyvqa-blip"), DEFAULT_SITES, args.repeats),
              # llava-1.5's 576 image tokens (random init, the model's widths): every layer's output at every position
              "llava-1.5 geometry (lm.*.layer)": measure(with_llava_15_geometry(llava), ["lm.*.layer"], args.repeats),
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
