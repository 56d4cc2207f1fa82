"""Evaluation and selection: keep the pairs a patching study can learn from.

A pair is kept when the model answers the clean input right, and the corruption flips the
logit difference `logit(correct) - logit(incorrect)` at the first answer step. The kept
pairs are then balanced across categories and answer order (seeded, without replacement),
and every filter's drop count is reported and stored beside the result.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from notice.errors import NoticeError
from notice.io import atomic_path, load_image
from notice.models import PromptBudget
from notice.pairs import CORRUPTIONS, Pair, write_pairs

FILTERS = ("duplicate", "prompt_too_long", "answers_share_first_token", "clean_wrong", "no_flip", "balance")


@dataclass
class Selection:
    """Kept pairs and, per corruption, how many pairs each filter dropped."""

    kept: list[Pair]
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    total: Counter = field(default_factory=Counter)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        kept = Counter(p.corruption for p in self.kept)
        corruptions = [c for c in CORRUPTIONS if self.total[c]]
        return {"settings": self.settings,
                "by_corruption": {c: {"input": self.total[c], **{f: self.dropped[c][f] for f in FILTERS},
                                      "kept": kept[c]} for c in corruptions},
                "input": sum(self.total.values()), "kept": len(self.kept),
                "dropped": {f: sum(self.dropped[c][f] for c in corruptions) for f in FILTERS}}


def selection_report_path(out: str | Path) -> Path:
    """Where the drop counts of a selection are stored: `<out stem>.selection.json` beside it."""
    out = Path(out)
    return out.parent / f"{out.stem}.selection.json"


# -------------------------------------------------------------------------- model runs
class _Images:
    """Images by path, loaded once per run; an unreadable one is named with its pair."""

    def __init__(self):
        self.cache: dict[str, Any] = {}

    def __call__(self, pair: Pair, key: str):
        path = getattr(pair, key)
        if path not in self.cache:
            try:
                self.cache[path] = load_image(path)
            except NoticeError as error:
                raise NoticeError(f"pair {pair.id} ({key}): {error}") from error
        return self.cache[path]


@torch.no_grad()
def pair_logits(adapter, pairs: Sequence[Pair], side: str, batch_size: int = 32, progress=None) -> torch.Tensor:
    """First answer-step logits [N, V] of each pair's clean or corrupt run.

    The corrupt run of a noise pair is the clean input with seeded noise on its embeddings, built
    by the same call the patching engine uses (`patching.inputs`); every other corrupt run is an
    ordinary input."""
    if side not in ("clean", "corrupt"):
        raise ValueError(f"side must be 'clean' or 'corrupt', not {side!r}")
    if side == "clean":  # pairs of one sample share their clean input: run it once
        keys = [(p.clean_image, p.clean_prompt) for p in pairs]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        order = sorted(set(first.values()))
        logits = _run(adapter, [pairs[i] for i in order], side, batch_size, progress)
        row_of = {keys[i]: r for r, i in enumerate(order)}
        return logits[[row_of[key] for key in keys]] if len(pairs) else logits
    return _run(adapter, pairs, side, batch_size, progress)


def _run(adapter, pairs: Sequence[Pair], side: str, batch_size: int, progress) -> torch.Tensor:
    from notice.patching.inputs import noisy_run

    out: list[torch.Tensor | None] = [None] * len(pairs)
    noisy = [i for i, p in enumerate(pairs) if side == "corrupt" and p.corruption.endswith("_noise")]
    noisy_set = set(noisy)
    plain = [i for i in range(len(pairs)) if i not in noisy_set]
    task = progress.add_task(f"{side} runs", total=len(pairs)) if progress is not None else None
    for start in range(0, len(plain), batch_size * 8):  # load a slice of images at a time
        chunk = plain[start:start + batch_size * 8]
        images = _Images()  # per slice, so memory stays bounded on large datasets
        pictures = [images(pairs[i], "clean_image" if side == "clean" else "corrupt_image") for i in chunk]
        prompts = [pairs[i].clean_prompt if side == "clean" else pairs[i].corrupt_prompt for i in chunk]
        for i, row in zip(chunk, adapter.answer_logits(pictures, prompts, batch_size=batch_size)):
            out[i] = row
        if task is not None:
            progress.advance(task, len(chunk))
    for start in range(0, len(noisy), batch_size * 8):
        chunk = noisy[start:start + batch_size * 8]
        images = _Images()
        pictures = [images(pairs[i], "clean_image") for i in chunk]
        for index in adapter.batches_by_length([pairs[i].clean_prompt for i in chunk], batch_size, pictures):
            members = [chunk[j] for j in index]
            run = noisy_run(adapter, [pairs[i] for i in members], [pictures[j] for j in index])
            for i, row in zip(members, adapter.run_logits(run)):
                out[i] = row
        if task is not None:
            progress.advance(task, len(chunk))
    return torch.stack(out) if out else torch.empty(0)  # type: ignore[arg-type]


def logit_differences(adapter, pairs: Sequence[Pair], logits: torch.Tensor) -> torch.Tensor:
    """logit(correct) - logit(incorrect) per pair, each answer scored by its first wordpiece."""
    correct = torch.tensor([adapter.answer_token_ids(p.correct)[0] for p in pairs], dtype=torch.long)
    incorrect = torch.tensor([adapter.answer_token_ids(p.incorrect)[0] for p in pairs], dtype=torch.long)
    rows = torch.arange(len(pairs))
    return logits[rows, correct] - logits[rows, incorrect]


# --------------------------------------------------------------------------- selection
def _identity(pair: Pair) -> tuple:
    noise = json.dumps(pair.metadata.get("noise"), sort_keys=True)
    return (pair.task, pair.corruption, pair.clean_image, pair.corrupt_image, pair.clean_prompt,
            pair.corrupt_prompt, pair.correct, pair.incorrect, noise)


def select_pairs(adapter, pairs: Sequence[Pair], threshold: float = 0.0, seed: int = 0, balance: bool = True,
                 max_per_cell: int | None = None, batch_size: int = 32, progress=None) -> Selection:
    """Filter pairs by the model's behaviour, then balance them.

    Kept: the clean run's top answer is the correct one and its logit difference exceeds
    `threshold`, and the corrupt run's logit difference is below `-threshold` (a flip)."""
    if threshold < 0:
        raise NoticeError(f"--threshold must be 0 or more, not {threshold}")
    selection = Selection(kept=[], settings={"threshold": threshold, "seed": seed, "balance": balance,
                                             "max_per_cell": max_per_cell, "model": adapter.name})
    for pair in pairs:
        selection.total[pair.corruption] += 1
    unique, seen, seen_ids = [], set(), set()
    for pair in pairs:
        key = _identity(pair)
        if key in seen or pair.id in seen_ids:
            selection.dropped[pair.corruption]["duplicate"] += 1
            continue
        seen.add(key)
        seen_ids.add(pair.id)
        unique.append(pair)
    budget = PromptBudget.of(adapter)
    readable = []
    for pair in unique:
        if budget.excess(pair.clean_prompt) or budget.excess(pair.corrupt_prompt):
            selection.dropped[pair.corruption]["prompt_too_long"] += 1
        else:
            readable.append(pair)
    distinct = []
    for pair in readable:
        if adapter.answer_token_ids(pair.correct)[0] == adapter.answer_token_ids(pair.incorrect)[0]:
            selection.dropped[pair.corruption]["answers_share_first_token"] += 1
        else:
            distinct.append(pair)
    if not distinct:
        return selection
    clean = pair_logits(adapter, distinct, "clean", batch_size, progress)
    corrupt = pair_logits(adapter, distinct, "corrupt", batch_size, progress)
    clean_ld = logit_differences(adapter, distinct, clean)
    corrupt_ld = logit_differences(adapter, distinct, corrupt)
    top = clean.argmax(dim=1)
    passed = []
    for i, pair in enumerate(distinct):
        right = int(top[i]) == adapter.answer_token_ids(pair.correct)[0] and float(clean_ld[i]) > threshold
        if not right:
            selection.dropped[pair.corruption]["clean_wrong"] += 1
        elif not float(corrupt_ld[i]) < -threshold:
            selection.dropped[pair.corruption]["no_flip"] += 1
        else:
            scores = {"clean_logit_diff": round(float(clean_ld[i]), 6),
                      "corrupt_logit_diff": round(float(corrupt_ld[i]), 6), "model": selection.settings["model"]}
            passed.append(replace(pair, metadata=dict(pair.metadata, selection=scores)))
    kept = balance_pairs(passed, seed, max_per_cell, equalize=balance)
    kept_ids = {p.id for p in kept}
    for pair in passed:
        if pair.id not in kept_ids:
            selection.dropped[pair.corruption]["balance"] += 1
    selection.kept = kept
    return selection


def balance_pairs(pairs: Sequence[Pair], seed: int, max_per_cell: int | None = None,
                  equalize: bool = True) -> list[Pair]:
    """Equal counts per (category, answer order) cell within each task and corruption, drawn
    without replacement by a seeded shuffle; input order is kept. Without `equalize`, cells
    are only capped at `max_per_cell`."""
    cells: dict[tuple, dict[tuple, list[Pair]]] = defaultdict(lambda: defaultdict(list))
    for pair in pairs:
        group = (pair.task, pair.corruption)
        cell = (str(pair.metadata.get("category", "")), _answer_order(pair))
        cells[group][cell].append(pair)
    rng = random.Random(seed)
    keep: set[str] = set()
    for group in sorted(cells):
        by_cell = cells[group]
        categories = sorted({category for category, _ in by_cell})
        # a category counts only with both answer orders present: order must never be confounded
        if equalize:
            complete = [c for c in categories if by_cell.get((c, True)) and by_cell.get((c, False))]
        else:
            complete = categories
        if not complete:
            continue
        size = min(len(by_cell[(c, order)]) for c in complete for order in (True, False)) if equalize else None
        if max_per_cell is not None:
            size = max_per_cell if size is None else min(size, max_per_cell)
        for category in complete:
            for order in (True, False):
                members = sorted(by_cell.get((category, order), []), key=lambda p: p.id)
                count = len(members) if size is None else min(size, len(members))
                keep.update(p.id for p in rng.sample(members, count))
    return [p for p in pairs if p.id in keep]


def _answer_order(pair: Pair) -> bool:
    """The order cell: whether the right option stands first in a two-way prompt, or for a yes/no prompt
    whether it asserts (answer yes) rather than negates; neither may be confounded with an effect."""
    if "negated" in pair.metadata:
        return not pair.metadata["negated"]
    return bool(pair.metadata.get("correct_first", True))


def write_selection(selection: Selection, out: str | Path,
                    provenance: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the kept pairs (Parquet, with `provenance` and the selection's settings in its metadata) and
    the drop counts (JSON beside it), both or neither."""
    out = Path(out)
    report = selection_report_path(out)
    if not selection.kept:
        raise NoticeError(f"no pair passed selection ({json.dumps(selection.as_dict()['dropped'])}); "
                          "check the model, or lower --threshold / pass --no-balance")
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps(selection.as_dict(), indent=2) + "\n")
    try:
        write_pairs(selection.kept, out, dict(provenance or {}, selection=selection.settings))
    except BaseException:
        report.unlink(missing_ok=True)
        raise
    return out, report
