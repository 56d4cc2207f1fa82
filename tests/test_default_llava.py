"""The embedded tiny LLaVA: it loads by name, answers easy-VQA as its card says, and patches exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from notice.io import load_image
from notice.models import EMBEDDED
from notice.tasks import easy_vqa

FOLDER = EMBEDDED["easyvqa-llava"]
pytestmark = pytest.mark.skipif(not (FOLDER / "model.safetensors").is_file(), reason="tiny LLaVA not trained yet")


@pytest.fixture(scope="module")
def default_llava():
    from notice.models import load_model

    return load_model("easyvqa-llava")


def test_answers_at_least_90_percent_of_200_fixed_test_questions(default_llava):
    questions = random.Random(0).sample(easy_vqa.load_questions("test"), 200)
    paths = easy_vqa.image_paths("test")
    images = [load_image(paths[q.image_id]) for q in questions]
    logits = default_llava.answer_logits(images, [q.question for q in questions])
    answer = {q.answer: default_llava.answer_token_ids(q.answer)[0] for q in questions}
    accuracy = sum(int(row.argmax()) == answer[q.answer] for row, q in zip(logits, questions)) / len(questions)
    assert accuracy >= 0.90, accuracy


def test_weights_are_small_enough_to_ship():
    assert (FOLDER / "model.safetensors").stat().st_size <= 20 * 1024 * 1024


def test_greedy_answers_name_colour_and_shape(default_llava):
    labels = easy_vqa.image_labels("test")
    label = labels[sorted(labels)[0]]
    other = next(s for s in easy_vqa.SHAPES if s != label.shape)
    image = load_image(label.path)
    answers = default_llava.generate([image, image], ["what color is the shape?",
                                                      easy_vqa.SHAPE_CHOICE.format(a=other, b=label.shape)],
                                     max_new_tokens=2)
    assert answers == [label.color, label.shape]


def test_model_card_numbers_are_reproduced_by_evaluate():
    from notice.evaluation import easy_vqa_accuracy

    card = json.loads((FOLDER / "card.json").read_text())
    result = easy_vqa_accuracy("easyvqa-llava", split="test", seed=card["test"]["seed"], limit_images=100)
    full = card["test"]["accuracy"]["all"]
    assert abs(result["accuracy"]["all"] - full) < 0.05  # a tenth of the split, against the card's whole split
    assert card["test"]["images"] == len({q.image_id for q in easy_vqa.load_questions("test")})


def test_color_pair_patching_at_the_answer_token_is_exact(default_llava):
    """On the trained model too, the KV-prefix path equals the plain hook way, to 1e-4."""
    from notice.models.base import PatchBatch

    labels = easy_vqa.image_labels("test")
    ordered = [labels[i] for i in sorted(labels)]
    clean_label = ordered[0]
    corrupt_label = next(l for l in ordered if l.color != clean_label.color and l.shape == clean_label.shape)
    question = "what color is the shape?"
    clean, corrupt = default_llava.runs_for(load_image(clean_label.path), load_image(corrupt_label.path),
                                            question, question)
    receiving, source = default_llava.trace(corrupt), default_llava.trace(clean)
    last = receiving.num_positions["lm"] - 1
    full = PatchBatch("lm", 0, "layer", torch.arange(last + 1)[None])
    torch.testing.assert_close(default_llava.patched_logits(receiving, source, full)[0], source.logits,
                               atol=1e-4, rtol=1e-4)
    heads = default_llava.streams["lm"].heads
    d = default_llava.streams["lm"].head_dim
    columns = torch.eye(heads, dtype=torch.bool).repeat_interleave(d, dim=1)
    fast = default_llava.patched_logits(receiving, source, PatchBatch("lm", 1, "self_attn.z",
                                                                      torch.full((heads, 1), last), columns))
    module = default_llava._lm.layers[1].self_attn.o_proj
    kept = {}
    handle = module.register_forward_pre_hook(lambda m, args: kept.__setitem__("z", args[0].clone()))
    default_llava.run_logits(clean)
    handle.remove()
    for h in range(heads):
        def patch(m, args, h=h):
            z = args[0].clone()
            z[:, last, h * d:(h + 1) * d] = kept["z"][:, last, h * d:(h + 1) * d]
            return (z,)
        handle = module.register_forward_pre_hook(patch)
        plain = default_llava.run_logits(corrupt)[0]
        handle.remove()
        torch.testing.assert_close(fast[h], plain, atol=1e-4, rtol=1e-4)
