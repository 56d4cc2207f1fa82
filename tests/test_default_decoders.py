"""The embedded decoder models (tiny LLaVA, tiny Llama-3.2-Vision): each loads by name, answers easy-VQA as
its card says, and patches exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from notice.io import load_image
from notice.models import EMBEDDED
from notice.tasks import easy_vqa

# each model's head sites at the answer (LLaVA's self-attention, Llama-3.2-Vision's both kinds), and a site
# where the whole image enters: LLaVA's first LM layer holds the image tokens; Llama-3.2-Vision's text sees
# the image only through its tower
HEAD_SITES = {"easyvqa-llava": ["lm.*.self_attn.head*@answer"],
              "easyvqa-mllama": ["lm.*.self_attn.head*@answer", "lm.*.cross_attn.head*@answer"]}
WHOLE_IMAGE = {"easyvqa-llava": "lm.0.layer@all", "easyvqa-mllama": "vision.0.layer@all"}
MODELS = [pytest.param(name, marks=pytest.mark.skipif(not (EMBEDDED[name] / "model.safetensors").is_file(),
                                                      reason=f"{name} not trained yet"))
          for name in HEAD_SITES]


@pytest.fixture(scope="module", params=MODELS)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def embedded(name):
    from notice.models import load_model

    return load_model(name)


def test_answers_at_least_95_percent_of_200_fixed_test_questions(embedded):
    questions = random.Random(0).sample(easy_vqa.load_questions("test"), 200)
    paths = easy_vqa.image_paths("test")
    images = [load_image(paths[q.image_id]) for q in questions]
    logits = embedded.answer_logits(images, [q.question for q in questions])
    answer = {q.answer: embedded.answer_token_ids(q.answer)[0] for q in questions}
    accuracy = sum(int(row.argmax()) == answer[q.answer] for row, q in zip(logits, questions)) / len(questions)
    assert accuracy >= 0.95, accuracy


def test_compares_the_colour_a_yes_no_question_names_with_the_shown_one(embedded):
    import helpers

    shown, other = helpers.yes_no_answers_about_colour(embedded)
    assert shown >= 0.95 and other >= 0.95, (shown, other)


def test_model_card_shows_at_least_95_percent_on_every_question_kind(name):
    import helpers

    accuracy = helpers.card_accuracies(EMBEDDED[name])
    assert min(accuracy.values()) >= 0.95, accuracy


def test_weights_are_small_enough_to_ship(name):
    assert (EMBEDDED[name] / "model.safetensors").stat().st_size <= 20 * 1024 * 1024


def test_greedy_answers_name_colour_and_shape(embedded):
    labels = easy_vqa.image_labels("test")
    label = labels[sorted(labels)[0]]
    other = next(s for s in easy_vqa.SHAPES if s != label.shape)
    image = load_image(label.path)
    answers = embedded.generate([image, image], ["what color is the shape?",
                                                 easy_vqa.SHAPE_CHOICE.format(a=other, b=label.shape)],
                                max_new_tokens=2)
    assert answers == [label.color, label.shape]


def test_model_card_numbers_are_reproduced_by_evaluate(name):
    """The card's table is what `notice evaluate --split test --model NAME` (`make model-card`) measures now
    on the whole split, to the digit."""
    from notice.evaluation import easy_vqa_accuracy

    card = json.loads((EMBEDDED[name] / "card.json").read_text())
    result = easy_vqa_accuracy(name, split="test", seed=card["test"]["seed"])
    assert result["accuracy"] == card["test"]["accuracy"]
    assert result["counts"] == card["test"]["counts"]
    assert card["test"]["images"] == len({q.image_id for q in easy_vqa.load_questions("test")})


def test_color_pair_patching_at_the_answer_token_is_exact(name, embedded):
    """On the trained model too, the engine's fast path equals one full forward per cell, to 1e-4."""
    from notice.pairs import Pair
    from notice.patching.engine import patch_pair
    from notice.patching.naive import naive_patch_pair

    labels = easy_vqa.image_labels("test")
    ordered = [labels[i] for i in sorted(labels)]
    clean = ordered[0]
    corrupt = next(l for l in ordered if l.color != clean.color and l.shape == clean.shape)
    question = "what color is the shape?"
    pair = Pair("color", "easyvqa-color", "image_smp", str(clean.path), str(corrupt.path), question, question,
                clean.color, corrupt.color)
    sites = HEAD_SITES[name] + [WHOLE_IMAGE[name]]
    fast, slow = patch_pair(embedded, pair, sites), naive_patch_pair(embedded, pair, sites)
    torch.testing.assert_close(torch.tensor(fast["ld"].to_numpy()), torch.tensor(slow["ld"].to_numpy()),
                               atol=1e-4, rtol=1e-4)
    assert fast.loc[fast["site"] == WHOLE_IMAGE[name], "normalized_effect"].item() == pytest.approx(1.0, abs=1e-4)
