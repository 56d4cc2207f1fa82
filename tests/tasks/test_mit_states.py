"""MIT-States: images/<adjective noun>/ folders, contrasting states of the same noun."""

from __future__ import annotations

from pathlib import Path

import pytest

import dataset_fixtures
import helpers
from notice.errors import NoticeError
from notice.pairs import read_pairs
from notice.tasks import build_pairs
from notice.tasks.mit_states import CATEGORY_OF, contrasts, near_synonyms


def _state(path: str) -> tuple[str, str]:
    adjective, _, noun = Path(path).parent.name.partition(" ")
    return adjective, noun


def test_partner_shows_the_same_noun_in_a_contrasting_state(tmp_path, bert_tokenizer):
    data = dataset_fixtures.mit_states(tmp_path / "mit")
    report = build_pairs("mit-states", tmp_path / "p.parquet", bert_tokenizer, data=data, seed=1,
                         corruptions=["image_smp", "text_str"])
    pairs = read_pairs(tmp_path / "p.parquet")
    smp = [p for p in pairs if p.corruption == "image_smp"]
    assert smp and report.skipped["folder without a categorised adjective"] == 2  # whole, sleepy
    used = [p.clean_image for p in smp if p.metadata["direction"] == "forward"]
    used += [p.corrupt_image for p in smp if p.metadata["direction"] == "forward"]
    assert len(used) == len(set(used))  # each image in at most one match
    for pair in smp:
        (adj, noun), (other, other_noun) = _state(pair.clean_image), _state(pair.corrupt_image)
        assert noun == other_noun and (pair.correct, pair.incorrect) == (adj, other)
        assert CATEGORY_OF[adj] == CATEGORY_OF[other] == pair.metadata["category"]
        assert other not in near_synonyms(adj)
        assert pair.clean_prompt in (f"is this {noun} {adj} or {other}?", f"is this {noun} {other} or {adj}?")
    for pair in (p for p in pairs if p.corruption == "text_str"):
        assert pair.metadata["str"]["replacement"] in contrasts(pair.correct)


def test_near_synonyms_are_never_contrasts():
    assert "tiny" not in contrasts("small") and "large" in contrasts("small")
    assert "ancient" not in contrasts("old") and "new" in contrasts("old")
    assert all(CATEGORY_OF[a] == CATEGORY_OF["wet"] for a in contrasts("wet"))


def test_empty_class_folder_is_named(tmp_path, bert_tokenizer):
    data = dataset_fixtures.mit_states(tmp_path / "mit", {"old car": 2, "new car": 2, "rusty car": 0})
    with pytest.raises(NoticeError, match="rusty car holds no images"):
        build_pairs("mit-states", tmp_path / "p.parquet", bert_tokenizer, data=data)
    assert not (tmp_path / "p.parquet").exists()
    report = build_pairs("mit-states", tmp_path / "p.parquet", bert_tokenizer, data=data, skip_bad=True)
    assert report.skipped["empty class folder"] == 1 and report.pairs["image_smp"] == 4


def test_unreadable_image_is_named(tmp_path, bert_tokenizer):
    data = dataset_fixtures.mit_states(tmp_path / "mit", {"old car": 2, "new car": 2})
    (data / "images" / "new car" / "1.jpg").write_bytes(b"\x00\x01")
    with pytest.raises(NoticeError, match=r"new car/1.jpg"):
        build_pairs("mit-states", tmp_path / "p.parquet", bert_tokenizer, data=data)
    report = build_pairs("mit-states", tmp_path / "p.parquet", bert_tokenizer, data=data, skip_bad=True)
    assert report.skipped["unreadable image"] == 1 and report.pairs["image_smp"] == 2


def test_paper_str_form_never_uses_a_near_synonym_of_either_option(tmp_path, bert_tokenizer):
    data = dataset_fixtures.mit_states(tmp_path / "mit")
    for pair in helpers.paper_str_pairs("mit-states", data, tmp_path / "p.parquet", bert_tokenizer, seed=1):
        banned = near_synonyms(pair.correct) | near_synonyms(pair.incorrect)
        assert all(w in CATEGORY_OF and w not in banned for w in pair.metadata["str"]["replacement"])
