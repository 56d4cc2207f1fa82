"""easy-VQA (the `easy-vqa` PyPI package): questions, per-image labels, two-way choice prompts.

easy-VQA images hold one shape of one pure colour on a light background. The
package ships questions and answers but no label table, so each image's colour
is read from its pixels (the palette below is exact) and its shape from the
questions asked about it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from notice.errors import NoticeError

# Exact fill colours of easy-VQA shapes (read from the images).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

# Two-way choice prompts in the form the NOTICE tasks use.
COLOR_CHOICE = "is the shape {a} or {b}?"
SHAPE_CHOICE = "is this a {a} or a {b}?"

QUESTION_KINDS = ("yes/no", "color", "shape", "choice")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image_id: int
    kind: str


@dataclass(frozen=True)
class ImageLabel:
    image_id: int
    path: Path
    color: str
    shape: str


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:  # pragma: no cover - installed with the project
        raise NoticeError("the easy-VQA data is missing: pip install easy-vqa") from error
    return easy_vqa


def question_kind(question: str, answer: str) -> str:
    """Classify a question by what it asks: yes/no, color, shape, or two-way choice."""
    if " or " in question:
        return "choice"
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"unknown easy-VQA answer {answer!r} for question {question!r}")


@lru_cache(maxsize=2)
def load_questions(split: str) -> tuple[Question, ...]:
    """easy-VQA's own questions for `split` ("train" or "test")."""
    ev = _easy_vqa()
    if split == "train":
        qs, ans, ids = ev.get_train_questions()
    elif split == "test":
        qs, ans, ids = ev.get_test_questions()
    else:
        raise NoticeError(f"unknown easy-VQA split {split!r}: use 'train' or 'test'")
    return tuple(Question(q, a, int(i), question_kind(q, a)) for q, a, i in zip(qs, ans, ids))


@lru_cache(maxsize=2)
def image_paths(split: str) -> dict[int, Path]:
    ev = _easy_vqa()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return {int(k): Path(v) for k, v in paths.items()}


def object_alpha(pixels: np.ndarray, color: str) -> np.ndarray:
    """Per-pixel coverage in [0, 1] of the shape (anti-aliased edges are fractional).

    Each pixel is a blend of the background and the shape's fill; the coverage is the
    position of the pixel on the line between the two colours.
    """
    rgb = pixels.astype(np.float64)
    background = _background_color(pixels)
    fill = np.array(PALETTE[color], dtype=np.float64)
    direction = fill - background
    alpha = ((rgb - background) @ direction) / max(float(direction @ direction), 1e-9)
    return np.clip(alpha, 0.0, 1.0)


def _background_color(pixels: np.ndarray) -> np.ndarray:
    corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]).astype(np.float64)
    values, counts = np.unique(corners, axis=0, return_counts=True)
    return values[np.argmax(counts)]


def pixel_color(pixels: np.ndarray) -> str:
    """The palette colour covering the most pixels (shape fills are exact palette values)."""
    flat = pixels.reshape(-1, 3)
    counts = {name: int(np.all(flat == rgb, axis=1).sum()) for name, rgb in PALETTE.items()}
    return max(counts, key=counts.get)


_SHAPE_RE = re.compile(r"\b(circle|rectangle|triangle)\b")


def _shape_from_questions(questions: list[Question]) -> str | None:
    """Infer the image's shape from answers; a negated question flips yes/no."""
    present: set[str] = set()
    absent: set[str] = set()
    for q in questions:
        if q.answer in SHAPES:
            return q.answer
        match = _SHAPE_RE.search(q.question)
        if not match:
            continue
        if q.kind != "yes/no":  # "what color is the triangle?" names the shape
            return match.group(1)
        negated = " not " in q.question or q.question.startswith("is no ")
        says_present = (q.answer == "yes") != negated
        (present if says_present else absent).add(match.group(1))
    if present:
        return next(iter(present))
    remaining = [s for s in SHAPES if s not in absent]
    return remaining[0] if len(remaining) == 1 else None


@lru_cache(maxsize=2)
def image_labels(split: str) -> dict[int, ImageLabel]:
    """Colour and shape of every image of `split` whose shape the questions determine."""
    by_image: dict[int, list[Question]] = {}
    for q in load_questions(split):
        by_image.setdefault(q.image_id, []).append(q)
    labels = {}
    for image_id, path in image_paths(split).items():
        shape = _shape_from_questions(by_image.get(image_id, []))
        if shape is None:
            continue
        color = pixel_color(np.asarray(Image.open(path).convert("RGB")))
        labels[image_id] = ImageLabel(image_id, path, color, shape)
    return labels


def choice_questions(labels: dict[int, ImageLabel], per_kind: int, seed: int) -> list[Question]:
    """Two-way choice questions (colour and shape), both answer orders, seeded."""
    rng = random.Random(seed)
    out = []
    for image_id in sorted(labels):
        label = labels[image_id]
        for _ in range(per_kind):
            other = rng.choice([c for c in COLORS if c != label.color])
            a, b = (label.color, other) if rng.random() < 0.5 else (other, label.color)
            out.append(Question(COLOR_CHOICE.format(a=a, b=b), label.color, image_id, "choice"))
            other = rng.choice([s for s in SHAPES if s != label.shape])
            a, b = (label.shape, other) if rng.random() < 0.5 else (other, label.shape)
            out.append(Question(SHAPE_CHOICE.format(a=a, b=b), label.shape, image_id, "choice"))
    return out


def all_questions(split: str, choice_per_kind: int, seed: int) -> list[Question]:
    """easy-VQA's questions plus seeded two-way choice questions for every labelled image."""
    return list(load_questions(split)) + choice_questions(image_labels(split), choice_per_kind, seed)
