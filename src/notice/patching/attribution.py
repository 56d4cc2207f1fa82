"""Attribution patching: every cell of a sweep estimated from one clean forward and one receiving
forward + backward, instead of one rerun per cell.

AtP (Nanda 2022): the metric's change when a site takes the source's activation is estimated to first
order, (a_source − a_receiving) · ∂LD/∂a at the receiving run, for every site at once. An attention head
is attributed through what it reads, its query, keys and values, to first order: the softmax is
linearised (`blocks.attention.first_order_change`), which is where AtP fails when attention saturates.

AtP* (Kramár et al. 2024) fixes AtP's two known failures:
- attention saturation (the QK fix): a head's attention patterns are computed exactly from its queries
  and keys in both runs (`blocks.attention.exact_change`), and only the step from the head's values onward
  is linear; that is the change of the head's values the two runs record;
- cancellation of direct and indirect effects (GradDrop): one backward per layer of the streams that carry
  the answer, with that layer's residual-branch gradient dropped; a cell's score is the mean over those
  backwards of its estimate's magnitude.
Its recommended use is to rank by AtP* and run the exact engine on the top of the ranking
(`--verify-top K`); `compare_tables` measures how far a ranking agrees with exact patching.

A cell's row keeps the exact table's columns: `ld` and `normalized_effect` are the estimate (AtP* uses its
QK-fixed estimate with the whole gradient), p(correct), Δp and KL cannot be estimated from one metric's
gradient and are NaN; `method` says which way made the row and `score` is what the ranking uses
(|estimate| for AtP, GradDrop's mean magnitude for AtP*).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from notice.errors import NoticeError
from notice.models.base import ALL, ModelAdapter, Run, Site, edit_activation
from notice.models.blocks.attention import first_order_change
from notice.pairs import Pair
from notice.patching.inputs import check_direction, pair_baseline, pair_runs
from notice.patching.metrics import answer_ids, pair_table
from notice.patching.naive import record
from notice.patching.sites import expand_sites

METHODS = ("exact", "atp", "atp*")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise NoticeError(f"unknown method {method!r}: use exact (one rerun per cell), atp or atp* (estimates "
                          "from gradients)")
    return method


def attribute_pair(adapter: ModelAdapter, pair: Pair, sites: Sequence[str], direction: str = "denoise",
                   method: str = "atp*", model_name: str = "") -> pd.DataFrame:
    """The results table of one pair, every cell estimated by AtP or AtP*."""
    check_direction(direction)
    if check_method(method) == "exact":
        raise ValueError("exact patching is patching.engine.patch_pair")
    clean, corrupt = pair_runs(adapter, pair)
    receiving, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    cells = expand_sites(sites, adapter.streams, adapter.num_positions(clean))
    whole = [site.name for site in cells if site.position == ALL]
    if whole:
        raise NoticeError(f"{whole[0]}: @all patches every position at once, which is no single node to attribute; "
                          "give positions (e.g. @answer, @last, a number, or none for every position)")
    # one plain forward of the source, one differentiable forward of the receiving run, a backward per drop
    hooks, source_logits = _hooks(cells), list[torch.Tensor]()
    theirs = record(adapter, source, list(hooks.values()), source_logits)
    correct, incorrect, _ = answer_ids(adapter.answer_token_ids, pair.correct, pair.incorrect)
    drops = [None] + ([(s, l) for s in adapter.gradient_streams for l in range(adapter.streams[s].layers)]
                      if method == "atp*" else [])
    mine, receiving_logits, gradients = _gradients(adapter, receiving, hooks, correct, incorrect, drops)
    differences = {key: theirs[site.module] - mine[key] for key, site in hooks.items()}  # heads: the QK fix
    if method == "atp":
        differences = _first_order_heads(adapter, receiving, source, cells, differences)
    clean_logits, corrupt_logits = ((source_logits[0], receiving_logits) if direction == "denoise"
                                    else (receiving_logits, source_logits[0]))
    base = pair_baseline(adapter, pair, clean_logits, corrupt_logits)
    estimates = {drop: _estimates(adapter, cells, differences, grads) for drop, grads in gradients.items()}
    estimate = estimates[None]
    score = (np.abs(estimate) if method == "atp"
             else np.mean([np.abs(value) for drop, value in estimates.items() if drop is not None], axis=0))
    ld = (base.ld_corrupt if direction == "denoise" else base.ld_clean) + estimate
    stats = np.stack([ld, np.full_like(ld, np.nan), np.full_like(ld, np.nan)], axis=1)
    table = pair_table(pair, direction, cells, stats, base, adapter.position_labels(clean),
                       adapter.position_labels(corrupt), model_name or adapter.name)
    table["kl"] = np.nan
    table["delta_p"] = np.nan
    table["method"], table["score"] = method, score
    return table


def hook_key(site: Site) -> str:
    """The activation a cell reads: one per module, and all heads of an attention share theirs."""
    return f"{site.stream}.{site.layer}.{site.target}"


def _hooks(cells: Sequence[Site]) -> dict[str, Site]:
    """One cell per activation the cells read."""
    return {hook_key(site): site for site in reversed(cells)}


Drop = tuple[str, int] | None


def _gradients(adapter: ModelAdapter, receiving: Run, cells: dict[str, Site], correct: int, incorrect: int,
               drops: Sequence[Drop]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[Drop, dict[str, torch.Tensor]]]:
    """One differentiable forward of the receiving run: the activations [P, W] the cells read, the answer
    logits [V], and ∂LD/∂a [P, W] from one backward per entry of `drops`: None (the whole gradient) or a
    (stream, layer) whose residual-branch writes pass no gradient back (GradDrop)."""
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[str, tuple[str, int] | None] = {"now": None}
    with ExitStack() as stack:
        for name, site in cells.items():
            def anchor(t: torch.Tensor, name: str = name) -> torch.Tensor:
                kept[name] = t = t + torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
                return t
            # the site's activation as [B, P, W] as `record` reads it (an input's rows as one row, flattened
            # rows, writes split over modules)
            for hook in adapter.edit_site(site, anchor, receiving):
                stack.callback(hook.remove)
        for stream, layer in (d for d in drops if d is not None):
            for component, path in adapter.stream_maps[stream].writes.items():
                if not adapter.streams[stream].has(component, layer):  # e.g. Llama-3.2-Vision's cross-attention
                    continue
                module = adapter.layer_module(stream, layer).get_submodule(path)
                stack.callback(edit_activation(module, "output", _gradient_gate(dropped, (stream, layer))).remove)
        logits = adapter.run_logits(receiving, grad=True)[0]
        metric = logits[correct] - logits[incorrect]
        names = list(kept)
        out = {}
        for drop in drops:
            dropped["now"] = drop
            grads = torch.autograd.grad(metric, [kept[n] for n in names], retain_graph=True, allow_unused=True)
            out[drop] = {n: (g[0] if g is not None else torch.zeros_like(kept[n][0])).detach() for n, g in zip(names, grads)}
    return {n: kept[n][0].detach() for n in names}, logits.detach(), out


def _gradient_gate(dropped: dict, which: tuple[str, int]):
    """A forward edit that leaves a write's value alone and stops its gradient while `which` is dropped."""
    def gate(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad:
            t.register_hook(lambda g: torch.zeros_like(g) if dropped["now"] == which else g)
        return t
    return gate


def _first_order_heads(adapter: ModelAdapter, receiving: Run, source: Run, cells: Sequence[Site],
                       differences: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head cells' value differences replaced by their first-order estimate from the heads' inputs
    (plain AtP), one attention layer at a time: never every pattern of the model at once."""
    heads = {hook_key(s): s for s in cells if s.head is not None}
    if not heads:
        return differences
    streams = {site.stream for site in heads.values()}
    mine, theirs = adapter.trace(receiving, streams), adapter.trace(source, streams)
    out = dict(differences)
    for key, site in heads.items():
        change = first_order_change(adapter.attention_inputs(mine, site.stream, site.layer, site.component),
                                    adapter.attention_inputs(theirs, site.stream, site.layer, site.component))
        count, positions, d = change.shape  # [H, T, d] → [T, H*d], as the values before the output projection
        out[key] = change.transpose(0, 1).reshape(positions, count * d).to(differences[key].dtype)
    return out


def _estimates(adapter: ModelAdapter, cells: Sequence[Site], differences: dict[str, torch.Tensor],
               gradients: dict[str, torch.Tensor]) -> np.ndarray:
    """Δa · ∂LD/∂a summed over each cell's rows and columns."""
    products = {key: differences[key].detach().double() * gradients[key].double() for key in differences}
    out = np.zeros(len(cells))
    for i, site in enumerate(cells):
        out[i] = float(products[hook_key(site)][int(site.position), adapter.site_columns(site) or slice(None)].sum())
    return out


def attribute_pairs(adapter: ModelAdapter, pairs: Sequence[Pair], sites: Sequence[str], direction: str = "denoise",
                    method: str = "atp*", progress=None, model_name: str = "") -> pd.DataFrame:
    """One table of every pair's estimates."""
    frames = []
    for pair in pairs:
        frames.append(attribute_pair(adapter, pair, sites, direction, method, model_name))
        if progress is not None:
            progress(len(frames[-1]))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------- agreement
def compare_tables(approx: pd.DataFrame, exact: pd.DataFrame, k: int = 20, k_prime: int = 100,
                   misses: int = 5) -> dict:
    """How an estimated table ranks cells against exact patching, pair by pair: Spearman correlation of the
    estimate with the exact effect, and whether the exact top-k cells (by |LD − LD_receiving|) are inside the
    estimate's top-k′ (by score); with the largest exact effects the estimate ranked lowest."""
    keys = ["pair_id", "site", "direction"]
    joined = approx.merge(exact, on=keys, suffixes=("", "_exact"))
    if joined.empty:
        raise NoticeError("the two tables share no (pair, site, direction) cell: compare tables of the same sweep")
    per_pair, worst = [], []
    for pair_id, rows in joined.groupby("pair_id", sort=True):
        receiving = rows["ld_corrupt"] if rows["direction"].iloc[0] == "denoise" else rows["ld_clean"]
        effect = (rows["ld_exact"] - receiving).abs()
        top = set(rows.loc[effect.nlargest(min(k, len(rows))).index, "site"])
        ranked = rows["score"].rank(ascending=False, method="first")
        inside = set(rows.loc[ranked <= k_prime, "site"])
        rho = _spearman(rows["ld"] - receiving, rows["ld_exact"] - receiving)
        per_pair.append({"pair_id": pair_id, "cells": len(rows), "spearman": rho,
                         f"recall@{k}in{k_prime}": len(top & inside) / len(top), "all_inside": top <= inside})
        for index in effect.nlargest(min(k, len(rows))).index:
            if rows.loc[index, "site"] not in inside:
                worst.append({"pair_id": pair_id, "site": rows.loc[index, "site"], "exact_effect": effect[index],
                              "estimate_rank": int(ranked[index])})
    table = pd.DataFrame(per_pair)
    worst_table = pd.DataFrame(worst, columns=["pair_id", "site", "exact_effect", "estimate_rank"])
    return {"pairs": len(table), "spearman_median": float(table["spearman"].median()),
            f"recall@{k}in{k_prime}_mean": float(table[f"recall@{k}in{k_prime}"].mean()),
            "pairs_with_all_inside": float(table["all_inside"].mean()), "per_pair": table,
            "largest_misses": worst_table.sort_values("exact_effect", ascending=False).head(misses)}


def _spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation: the Pearson correlation of the ranks (ties share their mean rank)."""
    if len(a) < 3:
        return float("nan")
    return float(np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1])


def pair_results(adapter: ModelAdapter, pair: Pair, sites: Sequence[str], direction: str = "denoise",
                 method: str = "exact", verify_top: int | None = None, model_name: str = "",
                 **exact_options) -> pd.DataFrame:
    """One pair's rows by `method`; with `verify_top` K, the K cells an estimate ranks highest are also
    patched exactly and their exact rows added (AtP*'s workflow: rank by the estimate, verify the top)."""
    from notice.patching.engine import patch_pair

    if check_method(method) == "exact":
        return patch_pair(adapter, pair, sites, direction, model_name=model_name, **exact_options)
    progress = exact_options.pop("progress", None)
    estimated = attribute_pair(adapter, pair, sites, direction, method, model_name)
    if progress is not None:
        progress(len(estimated))
    if not verify_top:
        return estimated
    top = estimated.nlargest(verify_top, "score")["site"].tolist()
    exact = patch_pair(adapter, pair, top, direction, model_name=model_name, **exact_options)
    return pd.concat([estimated, exact], ignore_index=True)
