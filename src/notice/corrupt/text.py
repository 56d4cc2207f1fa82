"""Symmetric Token Replacement (STR): corrupt a prompt by swapping a word for a contrast word.

The corrupt prompt must stay in distribution and aligned with the clean one: under the
model's own tokenizer both have the same number of tokens and differ only at the positions
of the replaced word. A candidate that changes the length or disturbs a neighbouring token
is rejected and counted, never padded.
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


def load_tokenizer(model: str):
    """The fast tokenizer of an embedded model name, a saved folder or a hub id (offsets are needed)."""
    from transformers import AutoTokenizer

    from notice.models import resolve_model

    source = resolve_model(model)  # a one-line error within seconds for an unknown name or an unreachable hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # unknown hub id, folder without tokenizer files
        raise NoticeError(f"cannot load the tokenizer of {model!r} ({error.__class__.__name__}); "
                          "pass --model with a folder written by save_pretrained or a reachable hub id") from error
    if not getattr(tokenizer, "is_fast", False):
        raise NoticeError(f"the tokenizer of {model!r} is not a fast tokenizer; STR needs token offsets")
    return tokenizer


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
    positions = token_positions(tokenizer, prompt, span)
    word = prompt[span[0]:span[1]]
    order = sorted(set(candidates) - {word})
    rng.shuffle(order)
    rejected = 0
    for candidate in order:
        corrupt = prompt[:span[0]] + candidate + prompt[span[1]:]
        changed = differing_positions(tokenizer, prompt, corrupt)
        new_positions = token_positions(tokenizer, corrupt, (span[0], span[0] + len(candidate)))
        if changed is None or not changed or not set(changed) <= set(positions) or new_positions != positions:
            rejected += 1
            continue
        return Replacement(corrupt, positions, word, candidate), rejected
    return None, rejected
