"""easy-VQA minimal pairs from the installed data and from a folder in its layout."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from notice.errors import NoticeError
from notice.io import load_mask
from notice.pairs import read_pairs
from notice.tasks import build_pairs
from notice.tasks.easy_vqa import COLORS, pixel_color


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_colour_pairs_differ_only_inside_the_object_mask(tmp_path, bert_tokenizer):
    out = tmp_path / "color.parquet"
    build_pairs("easyvqa-color", out, bert_tokenizer, limit=5, seed=3, corruptions=["image_smp"])
    pairs = read_pairs(out)
    assert len(pairs) == 10 and {p.metadata["direction"] for p in pairs} == {"forward", "reverse"}
    for pair in pairs:
        clean, corrupt = _pixels(pair.clean_image), _pixels(pair.corrupt_image)
        mask = load_mask(pair.metadata["clean_mask"])
        np.testing.assert_array_equal(clean[mask == 0], corrupt[mask == 0])
        assert np.any(clean[mask > 0] != corrupt[mask > 0])
        assert pixel_color(clean) == pair.correct and pixel_color(corrupt) == pair.incorrect
        assert pair.clean_prompt == pair.corrupt_prompt == f"is the shape {_options(pair)}?"
    # forward and reverse share the prompt, so the right answer comes first exactly half the time
    assert Counter(p.metadata["correct_first"] for p in pairs) == Counter({True: 5, False: 5})


def _options(pair) -> str:
    a, b = pair.clean_prompt.removeprefix("is the shape ").removesuffix("?").split(" or ")
    assert {a, b} == {pair.correct, pair.incorrect}
    return f"{a} or {b}"


def test_shape_pairs_redraw_in_the_same_colour_and_box(tmp_path, bert_tokenizer):
    out = tmp_path / "shape.parquet"
    build_pairs("easyvqa-shape", out, bert_tokenizer, limit=4, seed=0, corruptions=["image_smp"])
    for pair in read_pairs(out):
        clean, corrupt = _pixels(pair.clean_image), _pixels(pair.corrupt_image)
        old, new = load_mask(pair.metadata["clean_mask"]), load_mask(pair.metadata["corrupt_mask"])
        untouched = (old == 0) & (new == 0)
        np.testing.assert_array_equal(clean[untouched], corrupt[untouched])
        assert pixel_color(clean) == pixel_color(corrupt) == pair.metadata["color"]
        assert pair.correct != pair.incorrect and "is this a" in pair.clean_prompt
        ys, xs = np.nonzero(old > 0.5)
        ys2, xs2 = np.nonzero(new > 0.5)
        assert xs2.min() >= xs.min() - 1 and xs2.max() <= xs.max() + 1  # inside the old box
        assert ys2.min() >= ys.min() - 1 and ys2.max() <= ys.max() + 1


def test_every_corruption_shares_the_clean_input_of_its_sample(tmp_path, bert_tokenizer):
    out = tmp_path / "all.parquet"
    report = build_pairs("easyvqa-color", out, bert_tokenizer, limit=3, seed=0)
    by_sample: dict[str, list] = {}
    for pair in read_pairs(out):
        by_sample.setdefault(pair.metadata["sample"], []).append(pair)
    assert len(by_sample) == 6
    for pairs in by_sample.values():
        assert len({(p.clean_image, p.clean_prompt, p.correct, p.incorrect) for p in pairs}) == 1
        kinds = {p.corruption: p for p in pairs}
        assert {"image_smp", "image_noise", "text_noise"} <= set(kinds)
        assert kinds["image_noise"].metadata["noise"]["positions"] == "object"
        text = kinds["text_noise"].metadata["noise"]
        if "text_str" in kinds:  # text noise sits exactly where STR replaces the answer word
            assert text["positions"] == kinds["text_str"].metadata["str"]["positions"]
        assert text["seed"] == kinds["image_noise"].metadata["noise"]["seed"]
    assert report.pairs["image_smp"] == 6


def test_same_seed_same_pairs_and_another_seed_differs(tmp_path, bert_tokenizer):
    def frame(name, seed):
        build_pairs("easyvqa-color", tmp_path / name, bert_tokenizer, limit=6, seed=seed)
        return [(p.id, p.clean_prompt, p.corrupt_prompt, json.dumps(p.metadata.get("noise"))) for p in
                read_pairs(tmp_path / name)]

    assert frame("a.parquet", 1) == frame("b.parquet", 1)
    assert frame("a.parquet", 1) != frame("c.parquet", 2)


def test_data_folder_in_the_package_layout(tmp_path, bert_tokenizer):
    from notice.tasks.easy_vqa import image_paths, load_questions

    data = tmp_path / "easy"
    (data / "test" / "images").mkdir(parents=True)
    paths = image_paths("test")
    keep = sorted(paths)[:3]
    for image_id in keep:
        shutil.copy(paths[image_id], data / "test" / "images" / f"{image_id}.png")
    rows = [[q.question, q.answer, q.image_id] for q in load_questions("test") if q.image_id in keep]
    (data / "test" / "questions.json").write_text(json.dumps(rows))
    (data / "test" / "images" / f"{keep[0]}.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match=f"{keep[0]}.png"):
        build_pairs("easyvqa-color", tmp_path / "x.parquet", bert_tokenizer, data=data)
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x_files").exists()
    report = build_pairs("easyvqa-color", tmp_path / "x.parquet", bert_tokenizer, data=data, skip_bad=True)
    assert report.skipped["unreadable image"] == 1 and report.pairs["image_smp"] == 4
    assert not list(Path(tmp_path).glob(".*part*"))


def test_paper_str_form_swaps_both_colour_options_and_counts_what_it_cannot(tmp_path, bert_tokenizer):
    report = build_pairs("easyvqa-color", tmp_path / "color.parquet", bert_tokenizer, limit=4, seed=0,
                         corruptions=["image_smp", "text_str"], str_form="both")
    pairs = read_pairs(tmp_path / "color.parquet")
    both = [p for p in pairs if p.corruption == "text_str_both"]
    skipped = report.skipped["text_str_both: no two different contrast words of the options' token lengths"]
    assert both and len(both) == report.pairs["text_str_both"] and len(both) + skipped == 8
    assert "text_str" not in report.pairs and report.str_rejected["text_str_both"] > 0  # "teal" is tea + ##l
    for pair in both:
        helpers.assert_both_options_swapped(pair, bert_tokenizer)
        assert set(pair.metadata["str"]["replacement"]) <= set(COLORS)
    # easy-VQA has three shapes: no two words are left for both options, and each sample says so
    shapes = build_pairs("easyvqa-shape", tmp_path / "shape.parquet", bert_tokenizer, limit=3, seed=0,
                         corruptions=["image_smp", "text_str_both"])
    made = shapes.pairs["image_smp"]
    assert shapes.skipped["text_str_both: no two different contrast words of the options' token lengths"] == made
    with pytest.raises(NoticeError, match="unknown STR form 'three'"):
        build_pairs("easyvqa-color", tmp_path / "x.parquet", bert_tokenizer, limit=1, str_form="three")


def test_pairs_record_where_the_answer_word_sits_among_the_question_tokens(tmp_path, bert_tokenizer):
    build_pairs("easyvqa-color", tmp_path / "color.parquet", bert_tokenizer, limit=3, seed=0)
    for pair in read_pairs(tmp_path / "color.parquet"):
        record = pair.metadata["answer_tokens"]
        assert record["tokens"] == bert_tokenizer.convert_ids_to_tokens(bert_tokenizer(pair.clean_prompt)["input_ids"])
        assert record["question"] == [1, len(record["tokens"]) - 1]  # [CLS] ... [SEP]
        pieces = [record["tokens"][i] for i in record["positions"]]
        assert "".join(pieces).replace("##", "") == pair.correct  # "teal" is tea + ##l
        assert pieces[0] == record["first_piece"]
        # the research code reads one position before the word: its index skips [CLS]
        assert record["code_position"] == record["positions"][0] - 1


@pytest.mark.parametrize("task, attribute, form", [("easyvqa-color", "color", "is {} {} shape present?"),
                                                   ("easyvqa-shape", "shape", "is {} {} present?")])
def test_yes_no_str_asks_about_the_shown_value_and_swaps_only_that_word(tmp_path, bert_tokenizer, task, attribute,
                                                                        form):
    out = tmp_path / "yes-no.parquet"
    report = build_pairs(task, out, bert_tokenizer, limit=8, seed=0, corruptions=["text_str_yesno"])
    pairs = read_pairs(out)
    # one per sample, but where bert-base-uncased splits the word ("tea ##l", "rec ##tangle") and no other
    # value has as many tokens: STR's length check skips and counts those
    unmatched = report.skipped["text_str_yesno: no contrast word of equal token length"]
    assert len(pairs) == report.pairs["text_str_yesno"] == 16 - unmatched and len(pairs) >= 8
    for pair in pairs:
        shown = pair.metadata[attribute]
        if pair.metadata["direction"] == "reverse":  # the clean image is the SMP partner
            shown = pair.metadata["category"]
        negated = pair.metadata["negated"]
        assert pair.clean_image == pair.corrupt_image and pair.metadata["category"] == shown
        if attribute == "color":
            assert pixel_color(_pixels(pair.clean_image)) == shown
        assert pair.clean_prompt == form.format("no" if negated else "a", shown)
        other = pair.metadata["str"]["replacement"]
        assert other != shown and pair.corrupt_prompt == form.format("no" if negated else "a", other)
        assert (pair.correct, pair.incorrect) == (("no", "yes") if negated else ("yes", "no"))
        clean, corrupt = (bert_tokenizer(p)["input_ids"] for p in (pair.clean_prompt, pair.corrupt_prompt))
        assert len(clean) == len(corrupt)
        assert [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b] == pair.metadata["str"]["positions"]
    assert {p.metadata["negated"] for p in pairs} == {True, False}
    # asserting and negated prompts line up: one length, the named value at one position
    assert len({len(bert_tokenizer(p.clean_prompt)["input_ids"]) for p in pairs}) == 1


def test_yes_no_str_is_counted_as_skipped_for_a_task_without_the_form(bert_tokenizer):
    from notice.tasks.common import BuildReport, Sample, derive_pairs

    sample = Sample(id="s", task="toy", clean_image="a.png", corrupt_image="b.png", prompt="is it red or blue?",
                    correct="red", incorrect="blue", category="red", str_candidates=["red", "blue", "green"])
    report = BuildReport()
    assert derive_pairs(sample, bert_tokenizer, ["text_str_yesno"], 0, report) == []
    assert report.skipped == {"text_str_yesno: the task has no yes/no question form": 1}
