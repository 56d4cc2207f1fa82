"""Accuracy on easy-VQA per question kind, as the model card reports it."""

from __future__ import annotations

import torch

from notice.io import load_image
from notice.tasks import easy_vqa


@torch.no_grad()
def evaluate_model(model, processor, split: str = "test", seed: int = 0, limit_images: int | None = None,
                   choice_per_kind: int = 2) -> dict:
    """Accuracy per question kind: the first answer step's argmax over the whole vocabulary.

    "overall" covers easy-VQA's own questions; "choice" the seeded two-way choice questions;
    "all" both. Every answer is one wordpiece in the embedded vocabulary, so the argmax equals
    greedy generation's answer. Each image's vision pass is shared by its questions.
    """
    if getattr(model.config, "model_type", "") == "llava":
        return evaluate_llava(model, processor, split, seed, limit_images, choice_per_kind)
    questions, paths = _questions(split, seed, limit_images, choice_per_kind)
    image_ids = sorted({q.image_id for q in questions})
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    model_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    image_states = []
    for start in range(0, len(image_ids), 128):
        images = [load_image(paths[i]) for i in image_ids[start:start + 128]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, model_dtype)
        image_states.append(model.vision_model(pixel_values=pixels).last_hidden_state)
    image_states = torch.cat(image_states)

    tokenizer = processor.tokenizer
    encoded = [tokenizer(q.question)["input_ids"] for q in questions]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)  # equal lengths: no padding enters the answer step
    predicted = [0] * len(questions)
    for members in by_length.values():
        for start in range(0, len(members), 512):
            chunk = members[start:start + 512]
            input_ids = torch.tensor([encoded[i] for i in chunk], device=device)
            mask = torch.ones_like(input_ids)
            states = image_states[[row_of[questions[i].image_id] for i in chunk]]
            question_states = model.text_encoder(input_ids=input_ids, attention_mask=mask,
                                                 encoder_hidden_states=states).last_hidden_state
            bos = torch.full((len(chunk), 1), model.config.text_config.bos_token_id, device=device)
            logits = model.text_decoder(input_ids=bos, encoder_hidden_states=question_states,
                                        encoder_attention_mask=mask).logits[:, 0]
            for i, token in zip(chunk, logits.argmax(1).tolist()):
                predicted[i] = token

    return _accuracy(questions, predicted, tokenizer, split, len(image_ids), seed)


def _questions(split: str, seed: int, limit_images: int | None, choice_per_kind: int):
    questions = easy_vqa.all_questions(split, choice_per_kind, seed=seed + 1000)
    paths = easy_vqa.image_paths(split)
    if limit_images is not None:
        keep = set(sorted(paths)[:limit_images])
        questions = [q for q in questions if q.image_id in keep]
    return questions, paths


def _accuracy(questions, predicted: list[int], tokenizer, split: str, images: int, seed: int) -> dict:
    """Per-kind accuracy of predicted first answer tokens."""
    answer_id = {a: tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in {q.answer for q in questions}}
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
    return {"split": split, "questions": len(questions), "images": images, "seed": seed,
            "accuracy": {k: round(totals[k][0] / totals[k][1], 4) for k in order if k in totals},
            "counts": {k: totals[k][1] for k in order if k in totals}}


@torch.no_grad()
def evaluate_llava(model, processor, split: str = "test", seed: int = 0, limit_images: int | None = None,
                   choice_per_kind: int = 2) -> dict:
    """`evaluate_model` for LLaVA: the argmax of the next-token logits after the chat-template prompt,
    each image's vision tower and projector shared by its questions."""
    from notice.training.default_llava import answer_step_logits, image_features, prompt_ids

    questions, paths = _questions(split, seed, limit_images, choice_per_kind)
    image_ids = sorted({q.image_id for q in questions})
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    dtype = next(model.parameters()).dtype
    features = []
    for start in range(0, len(image_ids), 128):
        images = [load_image(paths[i]) for i in image_ids[start:start + 128]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(dtype)
        features.append(image_features(model, pixels))
    features = torch.cat(features)
    ids_of = {text: prompt_ids(processor, text) for text in {q.question for q in questions}}
    predicted: list[int] = []
    for start in range(0, len(questions), 256):
        chunk = questions[start:start + 256]
        owner = torch.tensor([row_of[q.image_id] for q in chunk])
        logits = answer_step_logits(model, [ids_of[q.question] for q in chunk], features[owner])[:, 0]
        predicted += logits.argmax(1).tolist()
    return _accuracy(questions, predicted, processor.tokenizer, split, len(image_ids), seed)


def easy_vqa_accuracy(model_name: str, split: str = "test", limit_images: int | None = None, seed: int = 0,
                      device: str = "cpu") -> dict:
    """Load a model by name and measure it on easy-VQA (used by `notice evaluate` and `notice demo`)."""
    from notice.models import load_model

    adapter = load_model(model_name, device=device)
    result = evaluate_model(adapter.model, adapter.processor, split, seed=seed, limit_images=limit_images)
    result["model"] = model_name
    return result
