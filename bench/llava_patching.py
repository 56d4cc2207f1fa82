"""LLaVA patching: the research code's way (three separate full forwards per cell) versus the
KV-prefix engine path, on one semantic minimal pair, in one run.

Sweeps: every LM layer and query head at the answer token; every image token for one layer's
attention output. Reports time and measured FLOPs per cell, checks both ways agree, and projects a
llava-1.5-7b head sweep from analytic FLOPs per cell.

`--geometry llava-1.5` keeps the model's widths and depths but gives it llava-1.5's token geometry:
336 px images in 14 px patches, 576 image tokens (random-init weights: the compute is the same).

    PYTHONPATH=src python bench/llava_patching.py [--model easyvqa-llava] [--geometry llava-1.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from research_way import color_pair, engine_cells, flops, forward_with_hook, research_cells

from notice.models import load_model
from notice.patching.sites import Site


def llava_7b_flops(text_tokens: int = 30) -> dict:
    """Analytic matmul FLOPs of llava-1.5-7b (CLIP ViT-L/14-336 to layer 23, Vicuna-7B, 576 image
    tokens): a full forward, and a head patch at the answer token rerun from layer l+1 (mean over l)."""
    d, ff, layers, vocab, kv = 4096, 11008, 32, 32064, 4096
    vd, vff, vlayers, vtokens = 1024, 4096, 23, 577
    tokens = 576 + text_tokens
    per_token_layer = 2 * (d * d * 2 + d * kv * 2 + 3 * d * ff)  # q, o, k, v projections and the gated MLP
    vision = vlayers * (vtokens * 2 * (4 * vd * vd + 2 * vd * vff) + 4 * vtokens * vtokens * vd)
    projector = 576 * 2 * (vd * d + d * d)
    logits = 2 * d * vocab  # the last position only
    lm = layers * (tokens * per_token_layer + 2 * tokens * tokens * d) + logits  # causal: half the score matrix
    full = vision + projector + lm
    patched_row = 2 * (d * d + 3 * d * ff)  # o_proj and MLP of the patched position in the patched layer
    rerun = [patched_row + (layers - l - 1) * (per_token_layer + 4 * tokens * d) + logits for l in range(layers)]
    return {"tokens": tokens, "full_forward": full, "research_cell": 3 * full,
            "engine_cell_answer_head": statistics.mean(rerun)}


def with_llava_15_geometry(adapter):
    """The adapter's model rebuilt, random-init, for 336 px images in 14 px patches (576 image tokens, as
    llava-1.5), widths, depths, tokenizer and chat template unchanged; saved and loaded like a user's."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    size, patch = 336, 14
    config = adapter.model.config
    config.vision_config.image_size, config.vision_config.patch_size = size, patch
    config.image_seq_length = (size // patch) ** 2
    config.text_config.max_position_embeddings = config.image_seq_length + 64
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    tokenizer = adapter.processor.tokenizer
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                     crop_size={"height": size, "width": size}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=adapter.processor.chat_template)
    folder = tempfile.mkdtemp(prefix="tiny-llava-336-")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return load_model(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="easyvqa-llava")
    parser.add_argument("--repeats", type=int, default=3, help="engine timings repeated; the median is kept")
    parser.add_argument("--research-cells", type=int, default=12, help="research-way cells timed per sweep")
    parser.add_argument("--geometry", choices=["model", "llava-1.5"], default="model",
                        help="the model's own image size, or llava-1.5's 576 image tokens (random init)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    adapter = load_model(args.model)
    if args.geometry == "llava-1.5":
        adapter = with_llava_15_geometry(adapter)
    report = {"model": args.model, "geometry": args.geometry, "threads": args.threads,
              **measure(adapter, color_pair(), args.repeats, args.research_cells)}
    big = llava_7b_flops(text_tokens=report["tokens"] - report["image_tokens"])
    ratio = big["research_cell"] / big["engine_cell_answer_head"]
    report["llava-1.5-7b projection"] = {
        **big, "flops_ratio": ratio,
        "reference_hours_per_head_index_a100": 6.0,
        "projected_minutes_per_head_index_same_throughput": 6.0 * 60 / ratio}
    print(json.dumps(report, indent=2))


def measure(adapter, pair: tuple, repeats: int, research_count: int, image_stride: int = 1) -> dict:
    """Both ways on one pair: the answer-token head sweep and an image-token sweep (every `image_stride`-th image
    token), time and FLOPs per cell."""
    pictures, question = pair
    clean, corrupt = adapter.runs_for(pictures[0], pictures[1], question, question)
    ids = clean.inputs.input_ids[0]
    answer, image = adapter.answer_position(ids), adapter.image_positions(ids).tolist()
    lm = adapter.streams["lm"]
    mid = lm.layers // 2
    sweeps = {
        "head sweep @ answer token": [Site("lm", l, "self_attn", h, answer) for l in range(lm.layers)
                                      for h in range(lm.heads)],
        f"image-token sweep, lm.{mid}.self_attn": [Site("lm", mid, "self_attn", None, p) for p in image[::image_stride]],
    }

    started = time.perf_counter()
    receiving, source = adapter.trace(corrupt), adapter.trace(clean)
    trace_seconds = time.perf_counter() - started
    full_flops = flops(lambda: forward_with_hook(adapter, corrupt))
    report: dict = {"tokens": int(ids.shape[0]), "image_tokens": len(image),
                    "vision_positions": adapter.num_positions(clean)["vision"],
                    "trace_seconds_per_pair": round(trace_seconds, 4), "full_forward_flops": full_flops, "sweeps": {}}
    for name, sites in sweeps.items():
        measured = engine_cells(adapter, receiving, source, sites, repeats)  # the engine's own grouping
        fast, engine_cell, engine_flops = measured["logits"], measured["seconds_per_cell"], measured["flops_per_cell"]

        research = research_cells(adapter, clean, corrupt, sites, fast, research_count, (pictures, question))
        research_cell_seconds, with_processor = research["seconds_per_cell"], research["seconds_per_cell_with_processor"]
        research_flops = 3 * full_flops
        report["sweeps"][name] = {
            "cells": len(sites), "engine_calls": measured["calls"], "research_cells_timed": research["timed"],
            "research_seconds_per_cell": research_cell_seconds, "engine_seconds_per_cell": engine_cell,
            "engine_seconds_per_cell_with_traces": engine_cell + trace_seconds / len(sites),
            "time_ratio": research_cell_seconds / engine_cell,
            "research_seconds_per_cell_with_processor": with_processor,
            "time_ratio_research_with_processor": with_processor / engine_cell,
            "time_ratio_with_traces": research_cell_seconds / (engine_cell + trace_seconds / len(sites)),
            "research_flops_per_cell": research_flops, "engine_flops_per_cell": engine_flops,
            "flops_ratio": research_flops / engine_flops, "max_abs_logit_difference": research["max_error"],
            "max_abs_patch_effect": float((fast - receiving.logits).abs().max())}
    return report


if __name__ == "__main__":
    main()
