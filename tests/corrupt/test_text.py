"""STR: equal token length, differences only at the replaced word, rejections counted."""

from __future__ import annotations

import random

import pytest

import helpers
from notice.corrupt.text import differing_positions, replace_word, replace_words, token_positions, word_span
from notice.errors import NoticeError

WORDS = ["red", "blue", "teal", "circle", "rectangle", "man", "woman", "riding", "sitting", "sliced",
         "caramelized", "happy", "disgusted", "sunflowers", "dog", "frisbee", "apple", "grass", "old", "ancient"]
FILLER = ["is", "the", "this", "a", "or", "shape", "person", "feeling", "picture", "of", "on", "in"]


@pytest.fixture(scope="module")
def tokenizer():
    return helpers.blip_processor(32).tokenizer


def test_every_str_pair_has_equal_length_and_differs_only_at_the_replaced_word(tokenizer):
    """Property test over seeded random prompts and contrast vocabularies."""
    rng = random.Random(1234)
    accepted = rejected_total = 0
    for _ in range(300):
        words = [rng.choice(FILLER + WORDS) for _ in range(rng.randint(2, 8))]
        target = rng.randrange(len(words))
        words[target] = rng.choice(WORDS)
        prompt = " ".join(words) + "?"
        start = sum(len(w) + 1 for w in words[:target])
        span = (start, start + len(words[target]))
        candidates = rng.sample(WORDS, 8)
        replacement, rejected = replace_word(tokenizer, prompt, span, candidates, random.Random(rng.random()))
        rejected_total += rejected
        if replacement is None:
            assert rejected == len(set(candidates) - {words[target]})
            continue
        accepted += 1
        clean_ids = tokenizer(prompt)["input_ids"]
        corrupt_ids = tokenizer(replacement.prompt)["input_ids"]
        assert len(clean_ids) == len(corrupt_ids)
        changed = [i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
        assert changed and set(changed) <= set(replacement.positions)
        assert replacement.positions == token_positions(tokenizer, prompt, span)
        # the corrupt prompt is the clean one with exactly that word swapped
        assert replacement.prompt == prompt[:span[0]] + replacement.replacement + prompt[span[1]:]
        assert replacement.replacement in candidates and replacement.replacement != words[target]
    assert accepted > 100 and rejected_total > 0  # both branches exercised


def test_candidates_of_another_token_length_are_rejected_not_padded(tokenizer):
    prompt = "is the shape red or blue?"
    span = word_span(prompt, "red")
    replacement, rejected = replace_word(tokenizer, prompt, span, ["teal", "caramelized", "green"], random.Random(0))
    assert replacement is not None and replacement.replacement == "green"  # teal = tea + ##l
    assert rejected in (0, 1, 2)
    none, count = replace_word(tokenizer, prompt, span, ["teal", "caramelized"], random.Random(0))
    assert none is None and count == 2
    assert differing_positions(tokenizer, prompt, "is the shape teal or blue?") is None


def test_same_seed_same_choice(tokenizer):
    prompt = "is the shape red or blue?"
    span = word_span(prompt, "red")
    picks = {replace_word(tokenizer, prompt, span, ["green", "black", "yellow", "brown"], random.Random(7))[0].prompt
             for _ in range(3)}
    assert len(picks) == 1


def test_answer_word_absent_from_prompt_is_a_one_line_error():
    with pytest.raises(NoticeError, match="'purple' does not occur in the prompt") as info:
        word_span("is the shape red or blue?", "purple")
    assert "\n" not in str(info.value)
    assert word_span("is the reddish shape red?", "red") == (21, 24)  # whole words only, not "reddish"


def test_both_options_are_swapped_for_different_words_at_equal_length(tokenizer):
    """Property test of the paper's form: every option swapped, tokens aligned, nothing else changed."""
    rng = random.Random(4321)
    accepted = 0
    for _ in range(150):
        a, b = rng.sample(WORDS, 2)
        prompt = f"is the {rng.choice(FILLER)} {a} or {b}?"
        spans = [word_span(prompt, a), word_span(prompt, b)]
        pools = [rng.sample(WORDS, 6), rng.sample(WORDS, 6)]
        swap, rejected = replace_words(tokenizer, prompt, spans, pools, random.Random(rng.random()))
        assert rejected >= 0
        if swap is None:
            continue
        accepted += 1
        new_a, new_b = swap.replacement
        assert swap.replaced == [a, b] and new_a != new_b and new_a != a and new_b != b
        assert new_a in pools[0] and new_b in pools[1]
        assert swap.prompt == prompt[:spans[0][0]] + new_a + prompt[spans[0][1]:spans[1][0]] + new_b + "?"
        clean_ids, corrupt_ids = tokenizer(prompt)["input_ids"], tokenizer(swap.prompt)["input_ids"]
        assert len(clean_ids) == len(corrupt_ids)
        changed = {i for i, (x, y) in enumerate(zip(clean_ids, corrupt_ids)) if x != y}
        assert changed and changed <= set(swap.positions)
        assert swap.positions == sorted(set(token_positions(tokenizer, prompt, spans[0]))
                                        | set(token_positions(tokenizer, prompt, spans[1])))
    assert accepted > 50


def test_one_shared_contrast_word_cannot_serve_both_options(tokenizer):
    prompt = "is the shape red or blue?"
    spans = [word_span(prompt, "red"), word_span(prompt, "blue")]
    swap, _ = replace_words(tokenizer, prompt, spans, [["green"], ["green"]], random.Random(0))
    assert swap is None
    swap, rejected = replace_words(tokenizer, prompt, spans, [["teal", "green"], ["teal", "black"]], random.Random(0))
    assert swap is not None and swap.replacement == ["green", "black"]  # teal = tea + ##l: another length
    assert swap.prompt == "is the shape green or black?" and rejected <= 2
    assert replace_words(tokenizer, prompt, spans, [["teal"], ["black"]], random.Random(0)) == (None, 1)
