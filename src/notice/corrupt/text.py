"""Symmetric Token Replacement (STR): corrupt a prompt by swapping words for contrast words.

The corrupt prompt must stay in distribution and aligned with the clean one: under the
model's own tokenizer both have the same number of tokens and differ only at the positions
of the replaced words. A candidate that changes the length or disturbs a neighbouring token
is rejected and counted, never padded.

Two forms: `replace_word` swaps one word (the right option, our `text_str`); `replace_words`
swaps several at once (both options of a two-way question, the NOTICE paper's form).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from notice.errors import NoticeError


@dataclass(frozen=True)
class Replacement:
    """One accepted STR corruption of a prompt."""

    prompt: str  # the corrupt prompt
    positions: list[int]  # token positions (special tokens included) that differ from the clean prompt
    replaced: str  # the clean word
    replacement: str  # the contrast word


def word_span(prompt: str, word: str, after: int = 0) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of `word` at or after `after`."""
    match = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])").search(prompt, after)
    if not word or match is None:
        raise NoticeError(f"answer word {word!r} does not occur in the prompt {prompt!r}; "
                          "every answer must be one of the prompt's options")
    return match.span()


def token_positions(tokenizer, text: str, span: tuple[int, int]) -> list[int]:
    """Token positions (special tokens included) whose characters overlap `span`."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    start, end = span
    return [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start]


def differing_positions(tokenizer, clean: str, corrupt: str) -> list[int] | None:
    """Positions where two prompts' token ids differ, or None when their lengths differ."""
    a, b = tokenizer(clean)["input_ids"], tokenizer(corrupt)["input_ids"]
    if len(a) != len(b):
        return None
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def replace_word(tokenizer, prompt: str, span: tuple[int, int], candidates: Sequence[str],
                 rng: random.Random) -> tuple[Replacement | None, int]:
    """Try the candidates in a seeded order; return the first that passes STR's check and the
    number rejected before it (all of them when none passes)."""
    swap, rejected = replace_words(tokenizer, prompt, [span], [candidates], rng)
    if swap is None:
        return None, rejected
    return Replacement(swap.prompt, swap.positions, swap.replaced[0], swap.replacement[0]), rejected


@dataclass(frozen=True)
class Replacements:
    """One accepted STR corruption that swaps several words of a prompt (each option of a two-way question)."""

    prompt: str  # the corrupt prompt
    positions: list[int]  # token positions (special tokens included) of every replaced word
    replaced: list[str]  # the clean words, in the order of the spans given
    replacement: list[str]  # their contrast words, all different


def replace_words(tokenizer, prompt: str, spans: Sequence[tuple[int, int]], candidates: Sequence[Sequence[str]],
                  rng: random.Random) -> tuple[Replacements | None, int]:
    """Swap the word at every span for one of its own candidates (all different), in a seeded order.

    Each swap must pass STR's check on its own (same tokens, aligned with the clean prompt), and
    the prompt with every swap must differ from the clean one only at the swapped words' tokens.
    Returns the first such combination and the number of candidate draws rejected on the way."""
    words = [prompt[a:b] for a, b in spans]
    positions = [token_positions(tokenizer, prompt, span) for span in spans]
    orders = []
    for word, options in zip(words, candidates):
        order = sorted(set(options) - {word})
        rng.shuffle(order)
        orders.append(order)
    verdicts: dict[tuple[int, str], bool] = {}  # each draw is checked (and counted) once

    def fits(k: int, candidate: str) -> bool:
        if (k, candidate) not in verdicts:
            verdicts[(k, candidate)] = _aligned(tokenizer, prompt, spans[k], positions[k], candidate)
        return verdicts[(k, candidate)]

    def choices(k: int, taken: frozenset[str]):
        if k == len(spans):
            yield []
            return
        for candidate in orders[k]:
            if candidate not in taken and fits(k, candidate):
                for rest in choices(k + 1, taken | {candidate}):
                    yield [candidate] + rest

    allowed = set().union(*positions)
    clashes = 0  # combinations whose swaps pass alone but disturb each other's tokens
    for choice in choices(0, frozenset()):
        corrupt = _substitute(prompt, spans, choice)
        changed = differing_positions(tokenizer, prompt, corrupt)
        if changed and set(changed) <= allowed:
            rejected = sum(not ok for ok in verdicts.values()) + clashes
            return Replacements(corrupt, sorted(allowed), words, choice), rejected
        clashes += 1
    return None, sum(not ok for ok in verdicts.values()) + clashes


def _aligned(tokenizer, prompt: str, span: tuple[int, int], positions: list[int], candidate: str) -> bool:
    """STR's check of one swap: equal token length, and only the replaced word's tokens change."""
    corrupt = prompt[:span[0]] + candidate + prompt[span[1]:]
    changed = differing_positions(tokenizer, prompt, corrupt)
    new_positions = token_positions(tokenizer, corrupt, (span[0], span[0] + len(candidate)))
    return changed is not None and bool(changed) and set(changed) <= set(positions) and new_positions == positions


def _substitute(prompt: str, spans: Sequence[tuple[int, int]], words: Sequence[str]) -> str:
    """The prompt with each span's text replaced (spans must not overlap)."""
    out, end = [], 0
    for (a, b), word in sorted(zip(spans, words)):
        out += [prompt[end:a], word]
        end = b
    return "".join(out) + prompt[end:]
