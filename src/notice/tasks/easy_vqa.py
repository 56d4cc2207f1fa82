"""easy-VQA (the `easy-vqa` PyPI package): questions, per-image labels, two-way choice prompts.

easy-VQA images hold one shape of one pure colour on a light background. The
package ships questions and answers but no label table, so each image's colour
is read from its pixels (the palette below is exact) and its shape from the
questions asked about it.
"""

from __future__ import annotations

import json
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

# easy-VQA's own yes/no forms about a colour, asserting and negated (answer "yes" when the
# named colour is shown, and "no" for the negated form).
COLOR_YES_NO = {"asserting": ("is there a {} shape?", "is there a {} shape in the image?",
                              "does the image contain a {} shape?", "is a {} shape present?"),
                "negated": ("is there not a {} shape?", "is there not a {} shape in the image?",
                            "does the image not contain a {} shape?", "is no {} shape present?")}
# The (asserting, negated) yes/no prompts of the yes/no STR pairs, easy-VQA's own forms: one word names the
# colour or shape, and both forms have one length, so every prompt of a condition lines up position by position.
YES_NO_FORMS = {"color": ("is a {} shape present?", "is no {} shape present?"),
                "shape": ("is a {} present?", "is no {} present?")}
_COLOR_RE = re.compile(rf"\b({'|'.join(PALETTE)})\b")


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


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks for absence ("is there not a ...", "is no ... present?")."""
    return " not " in question or question.startswith("is no ")


def shown_color_form(question: Question, shown: str) -> str | None:
    """"asserting" or "negated" for a yes/no question that names the image's own colour, else None.

    These are the yes/no questions whose answer depends on comparing the named and the shown
    colour; easy-VQA asks about a random one of eight colours, so they are one in eight."""
    match = _COLOR_RE.search(question.question)
    if question.kind != "yes/no" or match is None or match.group(1) != shown:
        return None
    return "negated" if is_negated(question.question) else "asserting"


@lru_cache(maxsize=4)
def load_questions(split: str, data: Path | None = None) -> tuple[Question, ...]:
    """easy-VQA's own questions for `split` ("train" or "test"), from the installed package or
    from a folder in its layout (`<data>/<split>/questions.json`)."""
    if split not in ("train", "test"):
        raise NoticeError(f"unknown easy-VQA split {split!r}: use 'train' or 'test'")
    if data is None:
        ev = _easy_vqa()
        qs, ans, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    else:
        qs, ans, ids = _read_questions(Path(data) / split / "questions.json")
    return tuple(Question(q, a, int(i), question_kind(q, a)) for q, a, i in zip(qs, ans, ids))


def _read_questions(path: Path) -> tuple[list[str], list[str], list[int]]:
    if not path.is_file():
        raise NoticeError(f"easy-VQA questions not found: {path}; --data must hold <split>/questions.json "
                          "and <split>/images/ as the easy-vqa package does")
    try:
        rows = json.loads(path.read_text())
        return [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows]
    except (ValueError, TypeError, IndexError) as error:
        raise NoticeError(f"cannot read {path}: {error.__class__.__name__}; it must be a JSON list of "
                          "[question, answer, image_id]") from error


@lru_cache(maxsize=4)
def image_paths(split: str, data: Path | None = None) -> dict[int, Path]:
    if data is None:
        ev = _easy_vqa()
        paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
        return {int(k): Path(v) for k, v in paths.items()}
    folder = Path(data) / split / "images"
    if not folder.is_dir():
        raise NoticeError(f"easy-VQA images not found: {folder}; --data must hold <split>/images/<id>.png")
    return {int(p.stem): p for p in folder.glob("*.png") if p.stem.isdigit()}


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
    return max(counts, key=lambda name: counts[name])


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
        says_present = (q.answer == "yes") != is_negated(q.question)
        (present if says_present else absent).add(match.group(1))
    if present:
        return next(iter(present))
    remaining = [s for s in SHAPES if s not in absent]
    return remaining[0] if len(remaining) == 1 else None


@lru_cache(maxsize=4)
def image_colors(split: str, data: Path | None = None) -> dict[int, str]:
    """The colour of every image of `split`, read from its pixels."""
    return {image_id: pixel_color(np.asarray(Image.open(path).convert("RGB")))
            for image_id, path in image_paths(split, data).items()}


@lru_cache(maxsize=4)
def image_labels(split: str, data: Path | None = None) -> dict[int, ImageLabel]:
    """Colour and shape of every image of `split` whose shape the questions determine."""
    by_image: dict[int, list[Question]] = {}
    for q in load_questions(split, data):
        by_image.setdefault(q.image_id, []).append(q)
    colors = image_colors(split, data)
    labels = {}
    for image_id, path in image_paths(split, data).items():
        shape = _shape_from_questions(by_image.get(image_id, []))
        if shape is not None:
            labels[image_id] = ImageLabel(image_id, path, colors[image_id], shape)
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


def shown_color_questions(colors: dict[int, str], per_image: int, seed: int) -> list[Question]:
    """Yes/no questions naming each image's own colour in easy-VQA's forms, asserting and negated
    in turn from a seeded start: as many "yes" as "no" answers, all of them decided by the comparison."""
    rng = random.Random(seed)
    out = []
    for image_id in sorted(colors):
        negated = rng.random() < 0.5
        for _ in range(per_image):
            form = "negated" if negated else "asserting"
            question = rng.choice(COLOR_YES_NO[form]).format(colors[image_id])
            out.append(Question(question, "no" if negated else "yes", image_id, "yes/no"))
            negated = not negated
    return out


def all_questions(split: str, choice_per_kind: int, seed: int) -> list[Question]:
    """easy-VQA's questions plus seeded two-way choice questions for every labelled image."""
    return list(load_questions(split)) + choice_questions(image_labels(split), choice_per_kind, seed)


# ------------------------------------------------------------------ semantic minimal pairs
def smp_samples(kind: str, split: str, data: Path | None, files, seed: int, limit: int | None, bad,
                report, progress=None) -> list:
    """easy-VQA's exact minimal pairs, both directions sharing one prompt.

    kind "color": the same picture with the shape recoloured; kind "shape": a different shape
    drawn in the same box and colour. Coverage masks of both objects are saved as PNG."""
    from notice.io import load_image, save_mask
    from notice.tasks.common import Sample, both_options_pool, choice_order, steps
    from notice.tasks.shape_edits import recolor, redraw

    if kind not in ("color", "shape"):
        raise ValueError(f"easy-VQA minimal pairs are 'color' or 'shape', not {kind!r}")
    task = f"easyvqa-{kind}"
    by_image: dict[int, list[Question]] = {}
    for q in load_questions(split, data):
        by_image.setdefault(q.image_id, []).append(q)
    paths = image_paths(split, data)
    image_ids = sorted(paths)[:limit] if limit is not None else sorted(paths)
    rng = random.Random(seed)
    samples = []
    for image_id in steps(progress, image_ids, f"{task} {split}"):
        path = paths[image_id]
        shape = _shape_from_questions(by_image.get(image_id, []))
        if shape is None and kind == "shape":  # about 5% of easy-VQA images: a data property, not bad input
            report.skipped["shape not determined by the image's questions"] += 1
            continue
        try:
            pixels = np.asarray(load_image(path))
        except NoticeError as error:
            bad("unreadable image", str(error))
            continue
        color = pixel_color(pixels)
        if kind == "color":
            new = rng.choice([c for c in COLORS if c != color])
            corrupt, alpha = recolor(pixels, color, new)
            old_alpha = new_alpha = alpha
            answers, vocabulary, template = (color, new), COLORS, COLOR_CHOICE
        else:
            new = rng.choice([s for s in SHAPES if s != shape])
            corrupt, old_alpha, new_alpha = redraw(pixels, color, new)
            answers, vocabulary, template = (str(shape), new), SHAPES, SHAPE_CHOICE
        if not (old_alpha > 0).any():
            bad("no shape found", f"image {path}: no {color} shape found on a uniform background")
            continue
        stem = f"{split}-{image_id}"
        write, corrupt_path = files.path(f"images/{task}-{stem}.png")
        Image.fromarray(corrupt).save(write)
        write, clean_mask = files.path(f"masks/{task}-{stem}-original.png")
        save_mask(old_alpha, write)
        if kind == "shape":
            write, corrupt_mask = files.path(f"masks/{task}-{stem}-redrawn.png")
            save_mask(new_alpha, write)
        else:
            corrupt_mask = clean_mask  # the recoloured object covers the same pixels
        a, b = choice_order(rng, *answers)
        prompt = template.format(a=a, b=b)
        pool = both_options_pool(answers, vocabulary, lambda word: ())  # palette colours and shapes: no synonyms
        meta = {"image_id": image_id, "split": split, "color": color, "shape": shape}
        for direction, (right, wrong), (clean, other), (mask, other_mask) in (
                ("forward", answers, (str(path), str(corrupt_path)), (clean_mask, corrupt_mask)),
                ("reverse", answers[::-1], (str(corrupt_path), str(path)), (corrupt_mask, clean_mask))):
            samples.append(Sample(
                id=f"{task}-{stem}-{direction}", task=task, clean_image=clean, corrupt_image=other, prompt=prompt,
                correct=right, incorrect=wrong, category=right, str_candidates=vocabulary,
                metadata=dict(meta, direction=direction, clean_mask=str(mask), corrupt_mask=str(other_mask)),
                noise_positions="object", str_both_candidates={a: pool, b: pool}, yes_no=YES_NO_FORMS[kind]))
    return samples
