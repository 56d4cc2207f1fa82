"""The NOTICE paper's head-selection rule, beside ours: tables in, tables out, no model.

Our default rule (`heads.rank_heads`) scores each head by its normalized effect at the position
where that effect is largest. The paper's circuit analysis scores each (pair, head) by
p(correct answer) after patching that head, read at one position: the question token that holds
the right answer's first wordpiece (BLIP's text encoder), or the answer word's last token (the
research code's LLaVA patching). Heads whose mean |score| over pairs reaches the mean over heads
plus 2 standard deviations are important; universal heads are important in every condition.

Rules:
- "default": ours, unchanged.
- "notice": the paper's rule at the answer word's own token.
- "notice-code": the research code's position exactly. It finds the token among the question's
  tokens without [CLS] but indexes patching scores that include [CLS], so it reads the token
  before the answer word. Causal language models read the answer word's last token in both.

Where the answer word sits among the question's tokens is recorded when pairs are built, with
the model's own tokenizer (pair metadata "answer_tokens"; `tasks.common.answer_token_record`).
Here the question's recorded tokens are found among the results table's token labels, which
places them in the model's input (after a chat template and image tokens, for LLaVA) without
loading a model. A pair the rule cannot score is listed with the reason, never guessed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from notice.analysis.heads import head_name
from notice.analysis.conditions import condition_labels
from notice.analysis.universal import universal_heads
from notice.errors import NoticeError

RULES = ("default", "notice", "notice-code")
PAPER_RULES = RULES[1:]
SCORE = "p_correct"  # the research code's "restoration probability": p(correct) after the patch
# Streams of a causal language model: the research code patches their heads at the answer
# word's last token (a later token cannot inform an earlier one there).
LAST_TOKEN_STREAMS = frozenset({"lm"})

RULE_TITLES = {
    "default": "default: mean |normalized effect| at each head's strongest position, above mean + 2σ",
    "notice": "notice: mean |p(correct)| at the answer word's token, at or above mean + 2σ (the paper's rule)",
    "notice-code": "notice-code: as notice, at the position the research code reads (the token before the "
                   "answer word in BLIP)",
}


def check_rules(rules: Sequence[str], name: str = "rules") -> list[str]:
    """The rules asked for (["notice"], ["default,notice"]), in a stable order; else one line naming
    `name` and what to write."""
    if not isinstance(rules, (list, tuple)) or not all(isinstance(rule, str) for rule in rules):
        raise NoticeError(f"{name} must be rule names, e.g. [default, notice], not {rules!r}")
    asked = [r.strip() for rule in rules for r in rule.split(",") if r.strip()]
    unknown = [r for r in asked if r not in RULES]
    if unknown or not asked:
        raise NoticeError(f"{name} has unknown head-selection rule(s) {', '.join(unknown) or '(none given)'}: "
                          f"use {', '.join(RULES)}")
    return [r for r in RULES if r in asked]


def answer_records(pairs: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """pair id → its recorded answer tokens (pairs built before the record existed have none)."""
    return {pair.id: pair.metadata["answer_tokens"] for pair in pairs if "answer_tokens" in pair.metadata}


def rule_positions(table: pd.DataFrame, records: dict[str, dict[str, Any]], stream: str,
                   rule: str) -> pd.DataFrame:
    """Per pair of the table: the `stream` position the rule reads, or why it reads none.

    Columns: pair_id, position (<NA> where unscored), reason ("" where scored)."""
    rows = table[(table["stream"] == stream) & table["position"].notna()].drop_duplicates(["pair_id", "position"])
    out = []
    for pair_id, pair_rows in rows.groupby("pair_id", sort=True):
        labels = dict(zip(pair_rows["position"].astype(int), pair_rows["token"].astype(str)))
        position, reason = _position(records.get(str(pair_id)), labels, stream, rule)
        out.append({"pair_id": pair_id, "position": position, "reason": reason})
    frame = pd.DataFrame(out, columns=["pair_id", "position", "reason"])
    return frame.astype({"position": "Int64"})


def _position(record: dict[str, Any] | None, labels: dict[int, str], stream: str, rule: str) -> tuple[int | None, str]:
    if record is None:
        return None, "no answer-token record in the pairs (rebuild them with `notice pairs`)"
    tokens, spans = record["tokens"], record["positions"]
    if rule == "notice-code" and stream not in LAST_TOKEN_STREAMS:
        if record["code_position"] is None:
            return None, "no question token contains the answer's first wordpiece"
        wanted = int(record["code_position"])
    elif not spans:
        return None, "answer word not in the question"
    elif record["first_piece"] not in tokens[spans[0]]:
        return None, "the tokenizer splits the answer word differently in the question"
    else:
        wanted = spans[-1] if stream in LAST_TOKEN_STREAMS else spans[0]
    offset, reason = question_offset(labels, tokens, record["question"])
    if offset is None:
        return None, reason
    position = wanted + offset
    if labels.get(position) != tokens[wanted]:
        return None, f"the results hold no token {tokens[wanted]!r} at position {position}"
    return position, ""


def question_offset(labels: dict[int, str], tokens: list[str], question: list[int]) -> tuple[int | None, str]:
    """How far the question tokenized alone sits from the model's input positions, found by
    matching its tokens to the table's labels (the first one may fuse with a template's text)."""
    start, end = question
    check = list(range(start + 1, end)) if end - start > 1 else list(range(start, end))
    if not check:
        return None, "empty question"
    offsets = [p - check[0] for p, label in labels.items() if label == tokens[check[0]]]
    found = [d for d in offsets if all(labels.get(i + d) == tokens[i] for i in check)]
    if len(found) == 1:
        return found[0], ""
    if found:
        return None, "the question's tokens occur more than once among the results' positions"
    return None, ("the question's tokens are not among the results' positions (patched at other positions, "
                  "or pairs made with another tokenizer)")


def rule_scores(heads: pd.DataFrame, positions: pd.DataFrame) -> pd.DataFrame:
    """One score per (pair, direction, layer, head): p(correct) after patching the head at the
    pair's rule position. `heads`: head rows with a condition column; returns pair_id, direction,
    condition, layer, head, score."""
    read = positions.dropna(subset=["position"])[["pair_id", "position"]]
    scored = heads[heads["position"].notna()].merge(read, on=["pair_id", "position"])
    # the research code turns an undefined score into 0 before averaging
    scored = scored.assign(score=scored[SCORE].astype(float).fillna(0.0))
    return scored[["pair_id", "direction", "condition", "layer", "head", "score"]].astype({"layer": int, "head": int})


def important_heads(scores: pd.DataFrame, sigmas: float = 2.0) -> pd.DataFrame:
    """Heads of one condition by mean |score| over pairs; important at or above the mean over heads
    plus `sigmas` standard deviations (as the research code compares)."""
    magnitude = scores.assign(magnitude=scores["score"].abs())
    by_head = magnitude.groupby(["layer", "head"])["magnitude"].agg(["mean", "count"]).reset_index()
    values = by_head["mean"].to_numpy(dtype=float)
    threshold = float(np.mean(values) + sigmas * np.std(values)) if len(values) else float("nan")
    ranked = pd.DataFrame({"layer": by_head["layer"], "head": by_head["head"], "mean_abs_score": values,
                           "pairs": by_head["count"]})
    ranked = ranked.sort_values(["mean_abs_score", "layer", "head"], ascending=[False, True, True], ignore_index=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["important"] = ranked["mean_abs_score"] >= threshold
    ranked.attrs["threshold"] = threshold
    return ranked


def rank_by_rule(table: pd.DataFrame, records: dict[str, dict[str, Any]], stream: str, component: str,
                 rule: str, sigmas: float = 2.0) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """A paper rule ("notice" or "notice-code") per condition: ({condition: important_heads table},
    per-pair coverage with columns pair_id, condition, position, reason)."""
    if rule not in PAPER_RULES:
        raise ValueError(f"rank_by_rule reads {' or '.join(PAPER_RULES)}, not {rule!r}")
    table = table.assign(condition=condition_labels(table))  # with the direction where both are held
    heads = table[(table["stream"] == stream) & (table["component"] == component) & table["head"].notna()]
    positions = rule_positions(table[table["pair_id"].isin(set(heads["pair_id"]))], records, stream, rule)
    patched = set(zip(heads["pair_id"], heads["position"]))
    for i in positions.index[positions["position"].notna()]:
        if (positions.at[i, "pair_id"], positions.at[i, "position"]) not in patched:
            positions.loc[i, "reason"] = f"heads not patched at position {positions.at[i, 'position']}"
            positions.loc[i, "position"] = pd.NA
    condition_of = dict(zip(table["pair_id"], table["condition"]))
    coverage = positions.assign(condition=positions["pair_id"].map(condition_of))
    scores = rule_scores(heads, positions)
    rankings = {str(condition): important_heads(rows, sigmas)
                for condition, rows in scores.groupby("condition", sort=True)}
    return rankings, coverage[["pair_id", "condition", "position", "reason"]]


def coverage_counts(coverage: pd.DataFrame) -> pd.DataFrame:
    """Pairs scored and unscored per condition, with the reasons and their counts."""
    rows = []
    for condition, group in coverage.groupby("condition", sort=True):
        unscored = group[group["reason"] != ""]
        reasons = unscored["reason"].value_counts()
        rows.append({"condition": condition, "pairs": len(group), "scored": len(group) - len(unscored),
                     "unscored": len(unscored),
                     "why unscored": "; ".join(f"{reason} ({count})" for reason, count in reasons.items()) or "–"})
    return pd.DataFrame(rows, columns=["condition", "pairs", "scored", "unscored", "why unscored"])


def head_sets(rankings: dict[str, pd.DataFrame], min_conditions: int | None = None) -> dict[str, set[str]]:
    """Important heads per condition, and the universal ones under "universal"."""
    sets = {condition: {head_name(r.layer, r.head) for r in ranked[ranked["important"]].itertuples()}
            for condition, ranked in rankings.items()}
    universal = universal_heads(rankings, min_conditions)
    sets["universal"] = set(universal["head"])
    return sets


def compare_rules(sets: dict[str, dict[str, set[str]]]) -> pd.DataFrame:
    """Side by side: each rule's important heads per condition (and universal), the heads every
    rule names, and those only one rule names."""
    rules = list(sets)
    conditions = sorted({c for per_rule in sets.values() for c in per_rule if c != "universal"}) + ["universal"]
    rows = []
    for condition in conditions:
        chosen = {rule: sets[rule].get(condition, set()) for rule in rules}
        shared = set.intersection(*chosen.values()) if chosen else set()
        row = {"condition": condition, **{rule: _names(heads) for rule, heads in chosen.items()},
               "in every rule": _names(shared)}
        for rule in rules:
            row[f"only {rule}"] = _names(chosen[rule] - set().union(*(chosen[r] for r in rules if r != rule)))
        rows.append(row)
    return pd.DataFrame(rows)


def _names(heads: set[str]) -> str:
    def key(name: str) -> tuple[int, int]:
        layer, head = name[1:].split("H")
        return int(layer), int(head)

    return ", ".join(sorted(heads, key=key)) or "–"
