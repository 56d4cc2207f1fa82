"""Per-cell metrics of activation patching, on the first answer step's logits.

LD is logit(correct) − logit(incorrect) at the first answer step, each answer scored by its first
wordpiece ("first_token", as the NOTICE research code did; the table says so in `answer_scoring`).
The normalized effect (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt) reads the same way in
both directions: 0 is the corrupt run's behaviour, 1 the clean run's. Δp is p(correct) patched minus
p(correct) of the receiving run (the corrupt run when denoising, the clean run when noising), and KL
is KL(clean ‖ patched) over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from notice.patching.sites import ALL, Site

DIRECTIONS = ("denoise", "noise")
ANSWER_SCORING = "first_token"
MIN_LD_GAP = 1e-3  # |LD_clean − LD_corrupt| below this (logits) leaves the normalized effect undefined
STATS = ("ld", "p_correct", "kl")  # what the device computes per cell, in this column order

COLUMNS = ["pair_id", "task", "corruption", "modality", "direction", "site", "stream", "layer", "component",
           "head", "position", "token", "corrupt_token", "ld", "normalized_effect", "p_correct", "delta_p", "kl",
           "ld_clean", "ld_corrupt", "p_clean", "p_corrupt", "flags", "answer_scoring", "correct", "incorrect",
           "model", "method", "score"]


@dataclass(frozen=True)
class Baseline:
    """The two unpatched runs of a pair, against which every cell is measured."""

    correct_id: int
    incorrect_id: int
    ld_clean: float
    ld_corrupt: float
    p_clean: float
    p_corrupt: float
    logp_clean: torch.Tensor  # [V] float64, on the model's device
    flags: tuple[str, ...]

    @property
    def gap(self) -> float:
        return self.ld_clean - self.ld_corrupt


def answer_ids(tokenizer_ids, correct: str, incorrect: str) -> tuple[int, int, tuple[str, ...]]:
    """First-wordpiece ids of both answers, and flags saying where that scoring loses information."""
    correct_ids, incorrect_ids = tokenizer_ids(correct), tokenizer_ids(incorrect)
    flags = []
    if len(correct_ids) > 1 or len(incorrect_ids) > 1:
        flags.append("multi_wordpiece_answer")
    if correct_ids[0] == incorrect_ids[0]:
        flags.append("same_first_wordpiece")
    return correct_ids[0], incorrect_ids[0], tuple(flags)


def baseline(clean_logits: torch.Tensor, corrupt_logits: torch.Tensor, correct_id: int, incorrect_id: int,
             flags: tuple[str, ...] = ()) -> Baseline:
    """Metrics of the clean and corrupt runs ([V] float32 logits each)."""
    logp_clean = torch.log_softmax(clean_logits.double(), dim=-1)
    logp_corrupt = torch.log_softmax(corrupt_logits.double(), dim=-1)
    ld_clean = float(clean_logits[correct_id] - clean_logits[incorrect_id])
    ld_corrupt = float(corrupt_logits[correct_id] - corrupt_logits[incorrect_id])
    if abs(ld_clean - ld_corrupt) < MIN_LD_GAP:
        flags = flags + ("tiny_ld_gap",)
    return Baseline(correct_id, incorrect_id, ld_clean, ld_corrupt, float(logp_clean[correct_id].exp()),
                    float(logp_corrupt[correct_id].exp()), logp_clean, flags)


def cell_stats(logits: torch.Tensor, base: Baseline) -> torch.Tensor:
    """[N, V] patched logits → [N, 3] (LD, p(correct), KL(clean ‖ patched)), still on the device."""
    logits = logits.double()  # KL sums |V| terms: float64 keeps it from going below zero by rounding
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp_clean = base.logp_clean
    ld = logits[:, base.correct_id] - logits[:, base.incorrect_id]
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(dim=-1)
    return torch.stack([ld, logp[:, base.correct_id].exp(), kl], dim=1)


def normalized_effect(ld: np.ndarray, base: Baseline) -> np.ndarray:
    """(LD − LD_corrupt) / (LD_clean − LD_corrupt); NaN (never ±inf) where the gap is tiny."""
    if abs(base.gap) < MIN_LD_GAP:
        return np.full_like(ld, np.nan, dtype=np.float64)
    return (ld - base.ld_corrupt) / base.gap


def pair_table(pair, direction: str, sites: Sequence[Site], stats: np.ndarray, base: Baseline,
               labels: dict[str, list[str]], corrupt_labels: dict[str, list[str]], model: str) -> pd.DataFrame:
    """One pair's rows of the long results table: one row per site, every metric and flag."""
    ld, p_correct, kl = (stats[:, i].astype(np.float64) for i in range(3))
    p_receiving = base.p_corrupt if direction == "denoise" else base.p_clean

    def label(table: dict[str, list[str]], site: Site) -> str:
        return "<all>" if site.position == ALL else table[site.stream][int(site.position)]

    frame = pd.DataFrame({
        "pair_id": pair.id, "task": pair.task, "corruption": pair.corruption, "modality": pair.modality,
        "direction": direction, "site": [s.name for s in sites], "stream": [s.stream for s in sites],
        "layer": [s.layer for s in sites], "component": [s.component for s in sites],
        "head": pd.array([s.head for s in sites], dtype="Int64"),
        "position": pd.array([None if s.position == ALL else int(s.position) for s in sites], dtype="Int64"),
        "token": [label(labels, s) for s in sites], "corrupt_token": [label(corrupt_labels, s) for s in sites],
        "ld": ld, "normalized_effect": normalized_effect(ld, base), "p_correct": p_correct,
        "delta_p": p_correct - p_receiving, "kl": kl,
        "ld_clean": base.ld_clean, "ld_corrupt": base.ld_corrupt, "p_clean": base.p_clean,
        "p_corrupt": base.p_corrupt, "flags": ",".join(base.flags), "answer_scoring": ANSWER_SCORING,
        "correct": pair.correct, "incorrect": pair.incorrect, "model": model,
        "method": "exact", "score": np.nan,  # attribution patching's rows say "atp"/"atp*" and rank by score
    }, columns=COLUMNS)
    return frame
