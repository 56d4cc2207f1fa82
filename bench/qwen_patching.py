"""Qwen2-VL / Qwen2.5-VL patching: the research code's way (three full forwards per cell) versus the
engine, on one semantic minimal pair, in one run (the measurement of bench/llava_patching.py).

Geometries, both random-init (the compute does not depend on the weights), saved and reloaded like a
user's checkpoint:

- `qwen2.5-vl-7b`: Qwen2.5-VL-7B's token geometry: the easy-VQA pair resized to 448 px, cut in 14 px
  patches merged 2x2 (1024 patches, 256 image tokens), 112 px attention windows, Qwen's chat template
  with its system prompt; widths and depths small (tower 4 layers of width 128, the last one with full
  attention; LM 4 layers of width 128, 4 query heads over 2 key/value heads);
- `tiny`: the contract suite's checkpoint (64 px images shrunk to 32 px: 64 patches, 16 image tokens).

Sweeps: every LM layer and query head at the answer token; every image token for one layer's
attention output. Also an analytic projection of Qwen2.5-VL-7B's answer-token head cell.

    PYTHONPATH=src python bench/qwen_patching.py [--family qwen2_5_vl] [--geometry qwen2.5-vl-7b] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "models")]

import tiny_qwen  # noqa: E402  (builders of random-init Qwen2-VL checkpoints)
from llava_patching import measure  # noqa: E402
from research_way import color_pair  # noqa: E402
from notice.models import load_model  # noqa: E402

GEOMETRIES = {
    "qwen2.5-vl-7b": (448, dict(patch=14, merge=2, max_side=3584, window=112, vision_hidden=128, vision_layers=4,
                                vision_heads=4, text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
                                text_mlp=512)),
    "tiny": (None, tiny_qwen.TINY),
}


def qwen25_vl_7b_flops(text_tokens: int, side: int = 448) -> dict:
    """Analytic matmul FLOPs of Qwen2.5-VL-7B-Instruct (its config.json) for a `side` px square image: a
    full forward (logits at the last position), and a head patch at the answer token rerun from layer l+1
    (mean over l). Tower: 32 layers of width 1280, gated MLP 3420, attention inside 112 px windows (64
    patches) except on 4 layers; merger 4·1280 → 5120 → 3584; LM: 28 layers of width 3584, 28 query heads
    and 4 key/value heads of 128, gated MLP 18944, vocabulary 152064."""
    patches = (side // 14) ** 2
    image_tokens = patches // 4
    vd, vff, vlayers, vfull, window = 1280, 3420, 32, 4, 64
    vision = vlayers * patches * 2 * (4 * vd * vd + 3 * vd * vff)  # qkv + proj, gated MLP
    vision += vfull * 4 * patches * patches * vd + (vlayers - vfull) * 4 * patches * window * vd  # scores, mixing
    merger = image_tokens * 2 * (4 * vd * 4 * vd + 4 * vd * 3584)
    d, ff, layers, vocab, kv = 3584, 18944, 28, 152064, 4 * 128
    tokens = image_tokens + text_tokens
    per_token_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * ff)  # q, o, k, v and the gated MLP
    logits = 2 * d * vocab
    lm = layers * (tokens * per_token_layer + 2 * tokens * tokens * d) + logits  # causal: half the scores
    full = vision + merger + lm
    patched_row = 2 * (d * d + 3 * d * ff)  # o_proj and MLP of the patched position in the patched layer
    rerun = [patched_row + (layers - l - 1) * (per_token_layer + 4 * tokens * d) + logits for l in range(layers)]
    return {"image_tokens": image_tokens, "tokens": tokens, "full_forward": full, "research_cell": 3 * full,
            "engine_cell_answer_head": statistics.mean(rerun)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_5_vl")
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="qwen2.5-vl-7b")
    parser.add_argument("--repeats", type=int, default=3, help="engine timings repeated; the median is kept")
    parser.add_argument("--research-cells", type=int, default=12, help="research-way cells timed per sweep")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    side, arch = GEOMETRIES[args.geometry]
    folder = tiny_qwen.save_qwen(Path(tempfile.mkdtemp(prefix=f"{args.family}-{args.geometry}-")), args.family, arch)
    adapter = load_model(str(folder))
    report = {"family": args.family, "geometry": args.geometry, "architecture": arch, "threads": args.threads,
              **measure(adapter, color_pair(side), args.repeats, args.research_cells)}
    big = qwen25_vl_7b_flops(text_tokens=report["tokens"] - report["image_tokens"])
    report["Qwen2.5-VL-7B projection"] = {**big, "flops_ratio": big["research_cell"] / big["engine_cell_answer_head"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
