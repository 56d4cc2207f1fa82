"""Accuracy on easy-VQA per question kind, as the model card reports it."""

from __future__ import annotations

import torch

from notice.io import load_image
from notice.models.base import ModelAdapter
from notice.tasks import easy_vqa

IMAGES_PER_STEP = 128


@torch.no_grad()
def evaluate(adapter: ModelAdapter, split: str = "test", seed: int = 0, limit_images: int | None = None,
             choice_per_kind: int = 2, batch_size: int = 256) -> dict:
    """Accuracy per question kind: the first answer step's argmax over the whole vocabulary.

    "overall" covers easy-VQA's own questions; "choice" the seeded two-way choice questions;
    "all" both. Every answer is one token in the embedded vocabularies, so the argmax equals
    greedy generation's answer. Each image is encoded once for all its questions.
    """
    questions = easy_vqa.all_questions(split, choice_per_kind, seed=seed + 1000)
    paths = easy_vqa.image_paths(split)
    if limit_images is not None:
        keep = set(sorted(paths)[:limit_images])
        questions = [q for q in questions if q.image_id in keep]
    by_image: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_image.setdefault(q.image_id, []).append(i)
    image_ids = sorted(by_image)
    predicted = [0] * len(questions)
    for start in range(0, len(image_ids), IMAGES_PER_STEP):
        chunk = image_ids[start:start + IMAGES_PER_STEP]
        members = [i for image_id in chunk for i in by_image[image_id]]
        row_of = {image_id: row for row, image_id in enumerate(chunk)}
        logits = adapter.answer_logits([load_image(paths[i]) for i in chunk], [questions[i].question for i in members],
                                       batch_size, image_index=[row_of[questions[i].image_id] for i in members])
        for i, token in zip(members, logits.argmax(dim=1).tolist()):
            predicted[i] = token
    answer_id = {a: adapter.answer_token_ids(a)[0] for a in {q.answer for q in questions}}
    shown = easy_vqa.image_colors(split)
    totals: dict[str, list[int]] = {}
    for q, token in zip(questions, predicted):
        hit = int(token == answer_id[q.answer])
        keys = ["all", q.kind] if q.kind == "choice" else ["all", "overall", q.kind]
        form = easy_vqa.shown_color_form(q, shown[q.image_id])
        if form is not None:  # the yes/no questions decided by comparing the named and the shown colour
            keys.append(f"yes/no shown color, {form}")
        for key in keys:
            totals.setdefault(key, [0, 0])
            totals[key][0] += hit
            totals[key][1] += 1
    order = ["overall", "yes/no", "yes/no shown color, asserting", "yes/no shown color, negated", "color", "shape",
             "choice", "all"]
    return {"split": split, "questions": len(questions), "images": len(image_ids), "seed": seed,
            "accuracy": {k: round(totals[k][0] / totals[k][1], 4) for k in order if k in totals},
            "counts": {k: totals[k][1] for k in order if k in totals}}


def evaluate_model(model, processor, split: str = "test", seed: int = 0, limit_images: int | None = None,
                   choice_per_kind: int = 2) -> dict:
    """`evaluate` for a transformers model and its processor (e.g. during training), through its adapter."""
    from notice.models import adapter_class

    adapter = adapter_class(model.config.model_type)(model, processor, "evaluated")
    return evaluate(adapter, split, seed, limit_images, choice_per_kind)


def easy_vqa_accuracy(model_name: str, split: str = "test", limit_images: int | None = None, seed: int = 0,
                      device: str = "cpu") -> dict:
    """Load a model by name and measure it on easy-VQA (used by `notice evaluate` and `notice demo`)."""
    from notice.models import load_model

    result = evaluate(load_model(model_name, device=device), split, seed=seed, limit_images=limit_images)
    result["model"] = model_name
    return result
