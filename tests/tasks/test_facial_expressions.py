"""Facial expressions: images/train/<emotion>/ folders, partners of the opposite sentiment."""

from __future__ import annotations

from pathlib import Path

import pytest

import datasets
from notice.errors import NoticeError
from notice.pairs import read_pairs
from notice.tasks import build_pairs
from notice.tasks.facial_expressions import EMOTION_ADJECTIVE, SENTIMENT, STR_WORDS


def test_partners_have_the_opposite_sentiment(tmp_path, bert_tokenizer):
    data = datasets.facial_expressions(tmp_path / "fer")
    build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data, seed=0,
                corruptions=["image_smp", "text_str"])
    pairs = read_pairs(tmp_path / "p.parquet")
    smp = [p for p in pairs if p.corruption == "image_smp"]
    others = sum(v for k, v in datasets.FER_COUNTS.items() if k != "happy")
    assert len(smp) == 2 * min(datasets.FER_COUNTS["happy"], others)  # every match needs one happy face
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
    data = datasets.facial_expressions(tmp_path / "fer", {"happy": 2, "sad": 2, "fear": 0})
    with pytest.raises(NoticeError, match="fear holds no images"):
        build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data)
    report = build_pairs("facial-expressions", tmp_path / "p.parquet", bert_tokenizer, data=data, skip_bad=True,
                         corruptions=["image_smp"])
    assert report.skipped["empty class folder"] == 1 and report.pairs["image_smp"] == 4
