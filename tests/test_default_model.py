"""The embedded default model: it loads by name and answers easy-VQA as its card says."""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from notice.cli import app
from notice.io import load_image
from notice.models import EMBEDDED
from notice.tasks import easy_vqa

pytestmark = pytest.mark.skipif(not (EMBEDDED["easyvqa-blip"] / "model.safetensors").is_file(),
                                reason="embedded model not trained yet")


def test_answers_at_least_95_percent_of_200_fixed_test_questions(default_blip):
    questions = random.Random(0).sample(easy_vqa.load_questions("test"), 200)
    paths = easy_vqa.image_paths("test")
    images = [load_image(paths[q.image_id]) for q in questions]
    logits = default_blip.answer_logits(images, [q.question for q in questions])
    predicted = default_blip.tokenizer.convert_ids_to_tokens(logits.argmax(1).tolist())
    accuracy = sum(p == q.answer for p, q in zip(predicted, questions)) / len(questions)
    assert accuracy >= 0.95, accuracy


def test_compares_the_colour_a_yes_no_question_names_with_the_shown_one(default_blip):
    import helpers

    shown, other = helpers.yes_no_answers_about_colour(default_blip)
    assert shown >= 0.95 and other >= 0.95, (shown, other)


def test_weights_are_small_enough_to_ship():
    size = (EMBEDDED["easyvqa-blip"] / "model.safetensors").stat().st_size
    assert size <= 20 * 1024 * 1024


def test_ask_answers_an_easy_vqa_test_image():
    label = easy_vqa.image_labels("test")[sorted(easy_vqa.image_labels("test"))[0]]
    runner = CliRunner()
    result = runner.invoke(app, ["ask", str(label.path), "what color is the shape?"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].strip() == label.color
    other = next(s for s in easy_vqa.SHAPES if s != label.shape)
    result = runner.invoke(app, ["ask", str(label.path), easy_vqa.SHAPE_CHOICE.format(a=other, b=label.shape)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].strip() == label.shape


def test_model_card_shows_at_least_95_percent_on_every_question_kind():
    import helpers

    accuracy = helpers.card_accuracies(EMBEDDED["easyvqa-blip"])
    assert min(accuracy.values()) >= 0.95, accuracy


def test_model_card_numbers_are_reproduced_by_evaluate():
    """The card's table is what `notice evaluate --split test` measures now, to the digit."""
    import json

    from notice.evaluation import easy_vqa_accuracy

    card = json.loads((EMBEDDED["easyvqa-blip"] / "card.json").read_text())
    result = easy_vqa_accuracy("easyvqa-blip", split="test", seed=card["test"]["seed"])
    assert result["accuracy"] == card["test"]["accuracy"]
    assert result["counts"] == card["test"]["counts"]
