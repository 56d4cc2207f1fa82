"""Facial expressions: images/train/<emotion>/ folders, partners of the opposite sentiment."""

from __future__ import annotations

from pathlib import Path

import pytest

import dataset_fixtures
import helpers
from notice.errors import NoticeError
from notice.pairs import read_pairs
from notice.tasks import build_pairs
from notice.tasks.facial_expressions import EMOTION_ADJECTIVE, SENTIMENT, STR_WORDS, near_synonyms, opposite_words


def test_partners_have_the_opposite_sentiment(tmp_path, bert_tokenizer):
    data = dataset_fixtures.facial_expressions(tmp_path / "fer")
    build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data, seed=0,
                corruptions=["image_smp", "text_str"])
    pairs = read_pairs(tmp_path / "p.parquet")
    smp = [p for p in pairs if p.corruption == "image_smp"]
    others = sum(v for k, v in dataset_fixtures.FER_COUNTS.items() if k != "happy")
    assert len(smp) == 2 * min(dataset_fixtures.FER_COUNTS["happy"], others)  # every match needs one happy face
    for pair in smp:
        clean = EMOTION_ADJECTIVE[Path(pair.clean_image).parent.name]
        other = EMOTION_ADJECTIVE[Path(pair.corrupt_image).parent.name]
        assert (pair.correct, pair.incorrect) == (clean, other)
        assert "positive" in (SENTIMENT[clean], SENTIMENT[other]) and SENTIMENT[clean] != SENTIMENT[other]
        assert pair.clean_prompt.startswith("is this person feeling ")
    for pair in (p for p in pairs if p.corruption == "text_str"):
        new = pair.metadata["str"]["replacement"]
        positive = new in STR_WORDS["positive"]
        assert positive != (SENTIMENT[pair.correct] == "positive")


def test_missing_split_folder_and_empty_emotion_folder(tmp_path, bert_tokenizer):
    with pytest.raises(NoticeError, match="images/train"):
        build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=tmp_path)
    data = dataset_fixtures.facial_expressions(tmp_path / "fer", {"happy": 2, "sad": 2, "fear": 0})
    with pytest.raises(NoticeError, match="fear holds no images"):
        build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data)
    report = build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data, skip_bad=True,
                         corruptions=["image_smp"])
    assert report.skipped["empty class folder"] == 1 and report.pairs["image_smp"] == 4


def test_paper_str_form_gives_each_option_a_word_of_its_opposite_sentiment(tmp_path, bert_tokenizer):
    data = dataset_fixtures.facial_expressions(tmp_path / "fer")
    for pair in helpers.paper_str_pairs("facial-expressions", data, tmp_path / "p.parquet", bert_tokenizer):
        banned = near_synonyms(pair.correct) | near_synonyms(pair.incorrect)
        for option, word in zip((pair.correct, pair.incorrect), pair.metadata["str"]["replacement"]):
            assert word in opposite_words(option) and word not in banned
