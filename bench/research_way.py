"""What the patching benchmarks share: the research code's way of patching one cell (three full forwards
of transformers' model with hooks), the engine's way on the same cells, and FLOP counting."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from notice.io import load_image
from notice.patching.engine import make_batches, plan
from notice.patching.sites import Site
from notice.tasks import easy_vqa


def forward_with_hook(adapter, run, site: Site | None = None, edit=None) -> torch.Tensor:
    """transformers' own forward of the whole model (logits at every position), as the research code ran it."""
    handle = None
    if edit is not None and site is not None:
        module, kind = adapter.hook_point(site)
        if kind == "input":
            handle = module.register_forward_pre_hook(lambda m, args: (edit(args[0]),) + tuple(args[1:]))
        else:
            handle = module.register_forward_hook(lambda m, args, out: edit(out))
    try:
        with torch.no_grad():
            return adapter.model(**run.inputs).logits[:, -1]  # every input the processor made (masks, image sizes)
    finally:
        if handle is not None:
            handle.remove()


def research_cell(adapter, clean, corrupt, site: Site, inputs=None) -> torch.Tensor:
    """The reference's way: a clean forward to record, a corrupt forward, a patched corrupt forward;
    with `inputs` (images, question) the processor also prepares both inputs per cell, as it did."""
    if inputs is not None:
        images, question = inputs
        clean = type(clean)(adapter.prepare([images[0]], [question]))
        corrupt = type(corrupt)(adapter.prepare([images[1]], [question]))
    kept = {}
    columns = adapter.site_columns(site) or slice(None)
    p = int(site.position)

    def grab(t):
        kept["v"] = t[:, p, columns].clone()
        return t

    def patch(t):
        t = t.clone()
        t[:, p, columns] = kept["v"]
        return t

    forward_with_hook(adapter, clean, site, grab)
    forward_with_hook(adapter, corrupt)  # the research code reruns the corrupt input for its baseline each cell
    return forward_with_hook(adapter, corrupt, site, patch)[0]


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def engine_cells(adapter, receiving, source, sites: list[Site], repeats: int) -> dict:
    """The engine's own grouping (`plan`, `make_batches`) through `patched_logits` on these cells: their
    logits in site order, the median seconds and the FLOPs per cell, and how many calls it made."""
    groups = plan(sites, list(adapter.streams), adapter.cross_layer_streams)
    batches = [make_batches(adapter, sites, group.cells, receiving, receiving.logits.device) for group in groups]
    order = torch.argsort(torch.tensor([i for group in groups for i in group.cells]))

    def engine() -> torch.Tensor:
        return torch.cat([adapter.patched_logits(receiving, source, b) for b in batches])[order]

    engine()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        logits = engine()
        times.append(time.perf_counter() - started)
    return {"logits": logits, "seconds_per_cell": statistics.median(times) / len(sites), "runs_seconds": times,
            "flops_per_cell": flops(engine) / len(sites), "calls": len(batches)}


def research_cells(adapter, clean, corrupt, sites: list[Site], fast: torch.Tensor, count: int, inputs=None) -> dict:
    """The research way on `count` of the cells spread evenly over the sweep: seconds per cell as the
    notebooks ran it (each run and the median), with `inputs` (images, question) also with the processor
    preparing both inputs per cell; the largest logit difference from the engine's logits `fast` (in site
    order)."""
    step = max(1, len(sites) // count)
    chosen = list(range(0, len(sites), step))[:count]
    times, with_processor, errors = [], [], []
    for i in chosen:
        started = time.perf_counter()
        slow = research_cell(adapter, clean, corrupt, sites[i])
        times.append(time.perf_counter() - started)
        if inputs is not None:
            started = time.perf_counter()
            research_cell(adapter, clean, corrupt, sites[i], inputs=inputs)
            with_processor.append(time.perf_counter() - started)
        errors.append(float((slow - fast[i]).abs().max()))
    out = {"timed": len(chosen), "runs_seconds": times, "seconds_per_cell": statistics.median(times),
           "max_error": max(errors)}
    if with_processor:
        out["seconds_per_cell_with_processor"] = statistics.median(with_processor)
    return out


def color_pair(size: int | None = None) -> tuple:
    """Two easy-VQA test images of one shape in different colours (resized to `size` px), one question."""
    labels = easy_vqa.image_labels("test")
    first = labels[sorted(labels)[0]]
    other = next(l for l in (labels[i] for i in sorted(labels)) if l.color != first.color and l.shape == first.shape)
    pictures = tuple(load_image(l.path) for l in (first, other))
    if size is not None:
        pictures = tuple(p.resize((size, size)) for p in pictures)
    return pictures, "what color is the shape?"


def cross_head_sweep(adapter, clean, corrupt, stream: str, positions: int, cells: int, repeats: int,
                     research_count: int) -> dict:
    """Every cross-attention head of `stream` at each of its first `positions` positions: `cells` of them,
    spread evenly over the sweep, timed the engine's way and `research_count` of those the research code's;
    the report fields the cross-attention benchmarks share."""
    facts = adapter.streams[stream]
    sweep = [Site(stream, l, "cross_attn", h, p) for l in facts.layers_of["cross_attn"] for h in range(facts.heads)
             for p in range(positions)]
    sites = sweep[::max(1, len(sweep) // cells)][:cells]

    started = time.perf_counter()
    receiving, source = adapter.trace(corrupt, {stream}), adapter.trace(clean, {stream})
    trace_seconds = time.perf_counter() - started
    measured = engine_cells(adapter, receiving, source, sites, repeats)
    fast, engine_cell, engine_flops = measured["logits"], measured["seconds_per_cell"], measured["flops_per_cell"]
    research = research_cells(adapter, clean, corrupt, sites, fast, research_count)
    research_seconds = research["seconds_per_cell"]
    research_flops = 3 * flops(lambda: forward_with_hook(adapter, corrupt))
    return {
        "positions": adapter.num_positions(clean), "sweep_cells": len(sweep), "cells_timed_engine": len(sites),
        "cells_timed_research": research["timed"], "engine_calls": measured["calls"],
        "engine_runs_seconds": measured["runs_seconds"],
        "research_cell_seconds": research["runs_seconds"], "trace_seconds_per_pair": round(trace_seconds, 3),
        "research_seconds_per_cell": research_seconds, "engine_seconds_per_cell": engine_cell,
        "time_ratio": research_seconds / engine_cell,
        "research_flops_per_cell": research_flops, "engine_flops_per_cell": engine_flops,
        "flops_ratio": research_flops / engine_flops, "max_abs_logit_difference": research["max_error"],
        "max_abs_patch_effect": float((fast - receiving.logits).abs().max()),
    }
