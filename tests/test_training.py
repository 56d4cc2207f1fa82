"""The recipes' data and auxiliary target: what teaches the embedded models yes/no questions about colour."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from notice.tasks import easy_vqa
from notice.training.default_blip import presence_loss


def test_shown_colour_questions_name_each_images_colour_with_balanced_answers():
    colors = {i: easy_vqa.COLORS[i % 8] for i in range(40)}
    questions = easy_vqa.shown_color_questions(colors, per_image=2, seed=0)
    assert len(questions) == 80 and Counter(q.answer for q in questions) == Counter({"yes": 40, "no": 40})
    forms = {form.format(c) for templates in easy_vqa.COLOR_YES_NO.values() for form in templates
             for c in easy_vqa.COLORS}
    for q in questions:
        assert q.kind == "yes/no" and q.question in forms  # easy-VQA's own wording
        form = easy_vqa.shown_color_form(q, colors[q.image_id])
        assert form == ("negated" if q.answer == "no" else "asserting")
    assert questions == easy_vqa.shown_color_questions(colors, per_image=2, seed=0)


def test_shown_colour_form_ignores_other_colours_and_other_kinds():
    def ask(text, answer="no", kind="yes/no"):
        return easy_vqa.Question(text, answer, 0, kind)

    assert easy_vqa.shown_color_form(ask("is there a blue shape?"), "red") is None
    assert easy_vqa.shown_color_form(ask("is no red shape present?"), "red") == "negated"
    assert easy_vqa.shown_color_form(ask("does the image contain a red shape?", "yes"), "red") == "asserting"
    assert easy_vqa.shown_color_form(ask("is the shape red or blue?", "red", "choice"), "red") is None


def test_presence_target_is_the_answer_flipped_by_negation_on_yes_no_questions_only():
    questions = [easy_vqa.Question("is there a red shape?", "yes", 0, "yes/no"),  # present
                 easy_vqa.Question("is there not a red shape?", "yes", 0, "yes/no"),  # absent
                 easy_vqa.Question("is no circle present?", "no", 0, "yes/no"),  # present
                 easy_vqa.Question("what color is the shape?", "red", 0, "color")]  # no target
    states = torch.eye(4)
    probe = torch.nn.Linear(4, 2)
    expected = F.cross_entropy(probe(states[:3]), torch.tensor([1, 0, 1]))
    torch.testing.assert_close(presence_loss(probe, states, questions), expected)
    assert presence_loss(probe, states[3:], questions[3:]).item() == 0.0


def test_shift_translates_each_image_and_fills_with_its_edge():
    from notice.training.default_blip import shift

    images = torch.zeros(2, 1, 6, 6)
    images[:, :, 2:4, 2:4] = 1.0  # a 2x2 object on a zero background
    moved = shift(images, torch.tensor([[1, -2], [0, 0]]))
    assert torch.equal(moved[1], images[1])
    assert moved[0, 0].nonzero().tolist() == [[3, 0], [3, 1], [4, 0], [4, 1]]


def test_patch_targets_mark_patches_the_object_covers_by_a_tenth():
    from notice.training.default_blip import patch_targets

    coverage = torch.zeros(1, 4, 4)
    coverage[0, 0, 0] = 0.4  # a tenth of the top-left 2x2 patch
    coverage[0, 3, 3] = 0.3  # less than a tenth of the bottom-right one
    assert patch_targets(coverage, torch.tensor([2]), 2).tolist() == [[3, 0, 0, 0]]


def test_mllama_recipe_trains_on_what_its_adapter_reads_and_the_image_reaches_the_loss():
    """At toy size: the stage-2 loss is the cross-entropy of the adapter's own answer logits (the answer, then
    end of text), and its gradient reaches the vision tower through the cross-attention gates."""
    import numpy as np
    from PIL import Image

    from notice.models.mllama import MllamaAdapter
    from notice.training.default_mllama import MllamaRecipe, build_model, build_processor, mllama_answer_loss

    recipe = MllamaRecipe(image_size=32, hidden=32, vision_layers=2, kept_layers=(0,), heads=2, mlp=64, lm_layers=3,
                          cross_layers=(1,), lm_heads=2, lm_kv_heads=1, lm_mlp=64)
    question = easy_vqa.Question("what color is the shape?", "green", 0, "color")
    processor = build_processor(recipe, [question.question, "is there a red shape?"], ["green", "red", "yes", "no"])
    model = build_model(recipe, processor.tokenizer)
    adapter = MllamaAdapter(model, processor, "toy")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inputs = adapter.prepare([image], [question.question])
    answer = adapter.answer_token_ids(question.answer)
    logits = adapter.answer_step_logits(adapter.answer_context(inputs), torch.tensor([answer]))[0]  # [2, V]
    expected = (F.cross_entropy(logits[:1], torch.tensor(answer))
                + 0.5 * F.cross_entropy(logits[1:], torch.tensor([processor.tokenizer.eos_token_id])))

    loss, _ = mllama_answer_loss(model, processor)(inputs.pixel_values[:, 0, 0], torch.tensor([0]), [question])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.model.vision_model.patch_embedding.weight.grad.abs().sum() > 0
