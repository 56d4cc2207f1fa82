"""Selection: which pairs survive each filter, balancing, and the stored drop counts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import helpers
from notice.errors import NoticeError
from notice.pairs import Pair, read_pairs
from notice.select import FILTERS, balance_pairs, select_pairs, selection_report_path, write_selection
from notice.tasks.easy_vqa import PALETTE, pixel_color

WORDS = ["red", "blue", "green", "black", "sun", "sunflowers", "is", "the", "shape", "or"]


class ColourReader:
    """A stand-in model with the adapter's answer methods: it names the image's colour when the
    prompt offers it (logit 5), gives the prompt's other options 1 and every other word 0."""

    name = "colour-reader"
    max_prompt_tokens = 12

    def token_length(self, question: str) -> int:
        return len(question.split()) + 2  # as a wordpiece tokenizer with [CLS] and [SEP] counts whole words

    def answer_token_ids(self, answer: str) -> list[int]:
        return [WORDS.index("sun")] if answer.startswith("sun") else [WORDS.index(answer)]

    def answer_logits(self, images, questions, batch_size: int = 64) -> torch.Tensor:
        out = torch.zeros(len(questions), len(WORDS))
        for row, (image, question) in enumerate(zip(images, questions)):
            seen = pixel_color(np.asarray(image))
            options = question.removeprefix("is the shape ").removesuffix("?").split(" or ")
            for word in options:
                out[row, self.answer_token_ids(word)[0]] = 5.0 if word == seen else 1.0
        return out


@pytest.fixture()
def images(tmp_path):
    paths = {}
    for colour in ("red", "blue", "green", "black"):
        paths[colour] = str(tmp_path / f"{colour}.png")
        helpers.shape_image(32, color=PALETTE[colour]).save(paths[colour])
    return paths


def _pair(images, pid, clean, corrupt, correct, incorrect, first=True, kind="image_smp", corrupt_prompt=None,
          category=None):
    a, b = (correct, incorrect) if first else (incorrect, correct)
    prompt = f"is the shape {a} or {b}?"
    return Pair(id=pid, task="toy", corruption=kind, clean_image=images[clean], corrupt_image=images[corrupt],
                clean_prompt=prompt, corrupt_prompt=corrupt_prompt or prompt, correct=correct, incorrect=incorrect,
                metadata={"category": category or correct, "correct_first": first})


def test_each_filter_drops_what_it_should(images):
    pairs = [
        _pair(images, "flips", "red", "blue", "red", "blue"),
        _pair(images, "flips", "red", "blue", "red", "blue"),  # duplicate id and content
        _pair(images, "wrong", "green", "blue", "red", "blue"),  # the model sees green: clean answer wrong
        _pair(images, "stays", "red", "red", "red", "blue"),  # corrupt image still red: no flip
        _pair(images, "str", "red", "red", "red", "blue", kind="text_str",
              corrupt_prompt="is the shape green or blue?"),  # STR removes the right option: flips
        _pair(images, "sun", "red", "blue", "sun", "sunflowers"),  # one first wordpiece for both answers
        _pair(images, "long", "red", "red", "red", "blue", kind="text_str",
              corrupt_prompt="is the shape a very very very dark green or blue?"),  # 13 tokens: more than it reads
    ]
    selection = select_pairs(ColourReader(), pairs, balance=False)
    assert sorted(p.id for p in selection.kept) == ["flips", "str"]
    summary = selection.as_dict()
    assert summary["dropped"] == {"duplicate": 1, "prompt_too_long": 1, "answers_share_first_token": 1,
                                  "clean_wrong": 1, "no_flip": 1, "balance": 0}
    for row in summary["by_corruption"].values():  # every input pair is accounted for
        assert row["input"] == row["kept"] + sum(row[f] for f in FILTERS)
    kept = {p.id: p for p in selection.kept}
    assert kept["flips"].metadata["selection"] == {"clean_logit_diff": 4.0, "corrupt_logit_diff": -4.0,
                                                   "model": "colour-reader"}
    assert kept["str"].metadata["selection"]["corrupt_logit_diff"] == -1.0


def test_threshold_is_the_margin_of_the_flip(images):
    pairs = [_pair(images, "smp", "red", "blue", "red", "blue"),
             _pair(images, "str", "red", "red", "red", "blue", kind="text_str",
                   corrupt_prompt="is the shape green or blue?")]
    assert len(select_pairs(ColourReader(), pairs, threshold=0.5, balance=False).kept) == 2
    strict = select_pairs(ColourReader(), pairs, threshold=2.0, balance=False)  # STR flips by 1 only
    assert [p.id for p in strict.kept] == ["smp"] and strict.as_dict()["dropped"]["no_flip"] == 1
    assert select_pairs(ColourReader(), pairs, threshold=4.0, balance=False).as_dict()["dropped"]["clean_wrong"] == 2
    with pytest.raises(NoticeError, match="threshold"):
        select_pairs(ColourReader(), pairs, threshold=-1)


def _cells(pairs):
    return Counter((p.metadata["category"], p.metadata["correct_first"]) for p in pairs)


def test_balance_equalises_categories_and_answer_order_without_replacement(images):
    pairs = []
    for i in range(5):
        pairs.append(_pair(images, f"r{i}", "red", "blue", "red", "blue", first=True))
    for i in range(2):
        pairs.append(_pair(images, f"rb{i}", "red", "blue", "red", "blue", first=False))
    for i in range(3):
        pairs.append(_pair(images, f"b{i}", "blue", "red", "blue", "red", first=i % 2 == 0))
    pairs.append(_pair(images, "g0", "green", "red", "green", "red", first=True))  # one order only
    kept = balance_pairs(pairs, seed=0)
    assert set(_cells(kept).values()) == {1} and set(_cells(kept)) == {("red", True), ("red", False),
                                                                       ("blue", True), ("blue", False)}
    assert len({p.id for p in kept}) == len(kept)
    assert [p.id for p in balance_pairs(pairs, seed=0)] == [p.id for p in kept]  # seeded
    draws = {tuple(p.id for p in balance_pairs(pairs, seed=s)) for s in range(10)}
    assert len(draws) > 1
    capped = balance_pairs(pairs, seed=0, max_per_cell=2, equalize=False)
    assert _cells(capped) == Counter({("red", True): 2, ("red", False): 2, ("blue", True): 2,
                                      ("blue", False): 1, ("green", True): 1})


def test_balance_equalises_yes_and_no_answers_of_yes_no_pairs(images):
    def yes_no(pid, negated):
        return Pair(id=pid, task="toy", corruption="text_str_yesno", clean_image=images["red"],
                    corrupt_image=images["red"], clean_prompt="is there a red shape?",
                    corrupt_prompt="is there a blue shape?", correct="no" if negated else "yes",
                    incorrect="yes" if negated else "no", metadata={"category": "red", "negated": negated})

    kept = balance_pairs([yes_no(f"a{i}", False) for i in range(5)] + [yes_no(f"n{i}", True) for i in range(2)], seed=0)
    assert Counter(p.correct for p in kept) == Counter({"yes": 2, "no": 2})


def test_selection_and_its_drop_counts_are_written_together(images, tmp_path):
    pairs = [_pair(images, "a", "red", "blue", "red", "blue", first=True),
             _pair(images, "b", "blue", "red", "blue", "red", first=False),
             _pair(images, "c", "green", "red", "red", "blue")]
    selection = select_pairs(ColourReader(), pairs, balance=False)
    out, report = write_selection(selection, tmp_path / "sel.parquet")
    assert report == selection_report_path(out) == tmp_path / "sel.selection.json"
    stored = json.loads(report.read_text())
    assert stored["kept"] == 2 and stored["dropped"]["clean_wrong"] == 1 and stored["settings"]["seed"] == 0
    assert [p.id for p in read_pairs(out)] == ["a", "b"]
    empty = select_pairs(ColourReader(), pairs[2:], balance=False)
    with pytest.raises(NoticeError, match="no pair passed selection"):
        write_selection(empty, tmp_path / "none.parquet")
    assert not (tmp_path / "none.parquet").exists() and not selection_report_path(tmp_path / "none.parquet").exists()
