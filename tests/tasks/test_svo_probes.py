"""SVO-Probes: the real CSV columns and an images folder named by image id."""

from __future__ import annotations

import pandas as pd
import pytest

import dataset_fixtures
import helpers
from notice.errors import NoticeError
from notice.pairs import read_pairs
from notice.tasks import build_pairs
from notice.tasks.svo_probes import ing_form, parse_triplet


def test_both_directions_of_every_row_with_role_prompts(tmp_path, bert_tokenizer):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    build_pairs("svo-probes", tmp_path / "p.parquet", bert_tokenizer, data=data, corruptions=["image_smp"])
    pairs = read_pairs(tmp_path / "p.parquet")
    assert len(pairs) == 2 * len(dataset_fixtures.SVO_ROWS)
    first = {p.metadata["direction"]: p for p in pairs if p.metadata["row"] == 2}
    assert first["forward"].clean_prompt == "is the man or the woman riding the horse?"
    assert (first["forward"].correct, first["forward"].incorrect) == ("man", "woman")
    assert (first["reverse"].correct, first["reverse"].incorrect) == ("woman", "man")
    assert first["forward"].clean_image == first["reverse"].corrupt_image.replace("n000", "p000")
    assert first["forward"].clean_image.endswith("p000.jpg") and first["forward"].corrupt_image.endswith("n000.jpg")
    verb = [p for p in pairs if p.metadata["role"] == "verb" and p.metadata["direction"] == "forward"][0]
    assert {verb.correct, verb.incorrect} == {"sitting", "lying"}  # the same -ing inflection
    assert {p.metadata["category"] for p in pairs} == {"subject", "verb", "object"}
    assert sum(p.metadata["correct_first"] for p in pairs) == len(pairs) // 2


def test_str_swaps_a_word_of_the_same_role(tmp_path, bert_tokenizer):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    build_pairs("svo-probes", tmp_path / "p.parquet", bert_tokenizer, data=data, corruptions=["text_str"])
    subjects = {"man", "woman", "dog", "girl", "boy", "child"}
    for pair in read_pairs(tmp_path / "p.parquet"):
        swap = pair.metadata["str"]
        assert swap["replaced"] == pair.correct and swap["replacement"] not in (pair.correct, pair.incorrect)
        if pair.metadata["role"] == "subject":
            assert swap["replacement"] in subjects
        if pair.metadata["role"] == "verb":
            assert swap["replacement"].endswith("ing")


@pytest.mark.parametrize("verb, form", [("ride", "riding"), ("sit", "sitting"), ("lie", "lying"), ("eat", "eating"),
                                        ("see", "seeing"), ("riding", "riding"), ("throw", "throwing")])
def test_verbs_take_the_ing_form(verb, form):
    assert ing_form(verb) == form


def test_triplets_in_both_csv_spellings():
    assert parse_triplet("man,ride,horse") == ("man", "ride", "horse")
    assert parse_triplet("['man,ride,horse']") == ("man", "ride", "horse")
    assert parse_triplet("['[]']") is None and parse_triplet("man,,horse") is None


def test_missing_column_names_the_file_and_writes_nothing(tmp_path, bert_tokenizer):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    table = pd.read_csv(data / "svo_probes.csv").drop(columns=["neg_triplet"])
    table.to_csv(data / "svo_probes.csv", index=False)
    with pytest.raises(NoticeError, match=r"svo_probes.csv lacks column\(s\) neg_triplet") as info:
        build_pairs("svo-probes", tmp_path / "p.parquet", bert_tokenizer, data=data)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "p.parquet").exists()


def test_bad_rows_stop_with_the_row_or_are_skipped_and_counted(tmp_path, bert_tokenizer):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    table = pd.read_csv(data / "svo_probes.csv")
    table.loc[1, "pos_triplet"] = "dog,sit"  # CSV row 3
    (data / "images" / "n003.jpg").unlink()  # row 5 loses its negative image
    (data / "images" / "p004.jpg").write_bytes(b"broken")  # row 6 has an unreadable image
    table.to_csv(data / "svo_probes.csv", index=False)
    with pytest.raises(NoticeError, match="row 3: triplets must read subject,verb,object"):
        build_pairs("svo-probes", tmp_path / "p.parquet", bert_tokenizer, data=data)
    report = build_pairs("svo-probes", tmp_path / "p.parquet", bert_tokenizer, data=data, skip_bad=True,
                         corruptions=["image_smp"])
    assert report.skipped == {"malformed triplet": 1, "missing image": 1, "unreadable image": 1}
    assert report.pairs["image_smp"] == 2 * (len(dataset_fixtures.SVO_ROWS) - 3)


def test_paper_str_form_swaps_both_options_for_other_words_of_the_role(tmp_path, bert_tokenizer):
    data = dataset_fixtures.svo_probes(tmp_path / "svo")
    for pair in helpers.paper_str_pairs("svo-probes", data, tmp_path / "p.parquet", bert_tokenizer):
        triplets = set(pair.metadata["pos_triplet"]) | set(pair.metadata["neg_triplet"])
        new = set(pair.metadata["str"]["replacement"])
        assert not new & triplets and not new & {ing_form(w) for w in triplets}  # no word of the question
        if pair.metadata["role"] == "verb":
            assert all(w.endswith("ing") for w in new)
