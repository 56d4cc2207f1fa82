"""Gemma 3 and LLaVA-OneVision patching: the research code's way (three full forwards per cell)
against the engine, on one semantic minimal pair, in one run; as bench/llava_patching.py for LLaVA.

Sweeps: every LM layer and query head at the answer token; one LM layer's attention output at the
image tokens (every `--image-stride`-th). Reports time and measured FLOPs per cell, checks both ways
agree, and projects the head sweep of the real checkpoints from analytic FLOPs.

`--geometry real` gives the model the real checkpoint's token geometry with small widths and depths
(random init; the token counts are the real ones): Gemma-3-4B's 896 px images, 64x64 SigLIP patches
pooled to 256 image tokens; LLaVA-OneVision's 384 px tiles of 27x27 patches and its 6x6 pinpoints,
on the easy-VQA images enlarged to 768 px (a base tile + 2x2 tiles: 3,699 image tokens).
`--geometry tiny` is the tests' checkpoint (tests/helpers.py).

    PYTHONPATH=src python bench/image_token_families.py --family gemma3 [--geometry real] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]

import helpers  # noqa: E402  (builders of random-init checkpoints)
from llava_patching import measure  # noqa: E402
from research_way import color_pair  # noqa: E402
from notice.models import load_model  # noqa: E402

SMALL = dict(vision_hidden=64, vision_layers=4, vision_heads=4, vision_mlp=256, text_hidden=128, text_layers=4,
             text_heads=4, text_kv_heads=2, text_mlp=512, max_positions=8192)
ARCH = {
    ("gemma3", "tiny"): helpers.TINY_GEMMA3,
    ("gemma3", "real"): dict(helpers.TINY_GEMMA3, **SMALL, image_size=896, patch_size=14, image_tokens=256,
                             head_dim=32, sliding_window=1024, sliding_pattern=2),
    ("llava_onevision", "tiny"): helpers.TINY_ANYRES,
    ("llava_onevision", "real"): dict(helpers.TINY_ANYRES, **SMALL, image_size=384, patch_size=14,
                                      pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
                                      aspect_ratio="anyres_max_9"),
}
IMAGE_SIDE = {("gemma3", "tiny"): 64, ("gemma3", "real"): 64, ("llava_onevision", "tiny"): 32,
              ("llava_onevision", "real"): 768}


def build(family: str, geometry: str):
    folder = Path(tempfile.mkdtemp(prefix=f"{family}-{geometry}-"))
    arch = ARCH[family, geometry]
    if family == "gemma3":
        helpers.save_gemma3(folder, arch)
    else:
        helpers.save_llava_onevision(folder, arch)
    return load_model(str(folder)), arch


# ------------------------------------------------------------------------ analytic FLOPs
def lm_layer_flops(d: int, ff: int, heads: int, kv: int, head_dim: int) -> int:
    """Matmul FLOPs of one position through one decoder layer's projections and gated MLP."""
    return 2 * (d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ff)


def vit_flops(layers: int, d: int, ff: int, tokens: int) -> int:
    return layers * (tokens * 2 * (4 * d * d + 2 * d * ff) + 4 * tokens * tokens * d)


def projection(name: str, vision: int, projector: int, d: int, ff: int, layers: int, heads: int, kv: int,
               head_dim: int, vocab: int, tokens: int, windows: list[int | None]) -> dict:
    """A full forward (logits at the last position) and the engine's answer-token head cell (mean over the
    patched layer: the patched row's o_proj and MLP, one token through every later layer, the LM head)."""
    per_token = lm_layer_flops(d, ff, heads, kv, head_dim)
    width = heads * head_dim

    def attention(keys: int) -> int:  # scores and weighted values of one query over `keys` keys
        return 4 * keys * width

    lm = sum(tokens * per_token + sum(attention(min(q + 1, w or tokens)) for q in range(tokens)) for w in windows)
    full = vision + projector + lm + 2 * d * vocab
    patched_row = 2 * (width * d + 3 * d * ff)
    rerun = [patched_row + sum(per_token + attention(min(tokens, windows[k] or tokens)) for k in range(l + 1, layers))
             + 2 * d * vocab for l in range(layers)]
    engine = statistics.mean(rerun)
    return {"checkpoint": name, "tokens": tokens, "full_forward": full, "research_cell": 3 * full,
            "engine_cell_answer_head": engine, "flops_ratio": 3 * full / engine}


def gemma3_projections(text_tokens: int) -> list[dict]:
    """Gemma-3-4B and -12B (config.json of google/gemma-3-{4b,12b}-it): SigLIP so400m at 896 px (4096
    patches, 27 layers, width 1152, MLP 4304), 256 image tokens, sliding window 1024 on 5 of every 6 layers."""
    vision = vit_flops(27, 1152, 4304, 4096)
    out = []
    for name, d, ff, layers, heads, kv in (("gemma-3-4b", 2560, 10240, 34, 8, 4), ("gemma-3-12b", 3840, 15360, 48,
                                                                                   16, 8)):
        windows: list[int | None] = [None if (l + 1) % 6 == 0 else 1024 for l in range(layers)]
        out.append(projection(name, vision, 256 * 2 * 1152 * d, d, ff, layers, heads, kv, 256, 262208,
                              256 + text_tokens, windows))
    return out


def onevision_projection(image_tokens: int, text_tokens: int, tiles: int) -> dict:
    """llava-onevision-qwen2-7b-ov: SigLIP so400m at 384 px per tile (729 patches, 26 layers used), a two-layer
    projector, Qwen2-7B (28 layers, width 3584, MLP 18944, 28 query and 4 key/value heads, vocabulary 152064)."""
    vision = tiles * vit_flops(26, 1152, 4304, 729)
    projector = tiles * 729 * 2 * (1152 * 3584 + 3584 * 3584)
    return projection("llava-onevision-qwen2-7b", vision, projector, 3584, 18944, 28, 28, 4, 128, 152064,
                      image_tokens + text_tokens, [None] * 28)


# ----------------------------------------------------------------------------- measuring
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=["gemma3", "llava_onevision"], required=True)
    parser.add_argument("--geometry", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5, help="engine timings repeated; the median is kept")
    parser.add_argument("--research-cells", type=int, default=12, help="research-way cells timed per sweep")
    parser.add_argument("--image-stride", type=int, default=1, help="every k-th image token in the image sweep")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    adapter, arch = build(args.family, args.geometry)
    side = IMAGE_SIDE[args.family, args.geometry]
    report = {"family": args.family, "geometry": args.geometry, "arch": arch, "threads": args.threads,
              **measure(adapter, color_pair(side), args.repeats, args.research_cells, args.image_stride)}
    text_tokens = report["tokens"] - report["image_tokens"]
    if args.family == "gemma3":
        report["projections"] = gemma3_projections(text_tokens)
    else:
        tiles = report["vision_positions"] // adapter.vision_positions()
        report["projections"] = [onevision_projection(3699 if args.geometry == "tiny" else report["image_tokens"], text_tokens,
                                                      5 if args.geometry == "tiny" else tiles)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
