"""Facial expressions (FER-style folders): `images/<split>/<emotion>/*.jpg`.

A sample asks "is this person feeling {a} or {b}?"; its minimal partner is a face showing an
emotion of the opposite sentiment (positive against negative or neutral), and STR swaps the
right emotion for an adjective of the opposite sentiment, as in the NOTICE paper.
"""

from __future__ import annotations

import random
from pathlib import Path

from notice.errors import NoticeError
from notice.tasks.common import Bad, BuildReport, Sample, both_directions, both_options_pool, choice_order
from notice.tasks.common import class_images, pair_up, steps

TASK = "facial-expressions"
PROMPT = "is this person feeling {a} or {b}?"

# Folder names of the dataset → the adjective a prompt uses.
EMOTION_ADJECTIVE = {"angry": "angry", "disgust": "disgusted", "disgusted": "disgusted", "fear": "fearful",
                     "fearful": "fearful", "happy": "happy", "neutral": "neutral", "sad": "sad",
                     "surprise": "surprised", "surprised": "surprised"}
SENTIMENT = {"happy": "positive", "angry": "negative", "disgusted": "negative", "fearful": "negative",
             "sad": "negative", "neutral": "neutral", "surprised": "neutral"}
OPPOSITE = {"positive": ("negative", "neutral"), "negative": ("positive",), "neutral": ("positive",)}

# Contrast adjectives for STR, by sentiment (the dataset's emotions plus everyday near relations).
STR_WORDS = {
    "positive": ("happy", "cheerful", "glad", "joyful", "pleased", "delighted", "content", "proud", "relaxed",
                 "amused", "hopeful", "grateful"),
    "negative": ("angry", "sad", "disgusted", "fearful", "scared", "upset", "lonely", "nervous", "worried",
                 "anxious", "miserable", "furious", "annoyed", "ashamed", "jealous", "gloomy"),
    "neutral": ("neutral", "surprised", "bored", "calm", "curious", "puzzled", "thoughtful", "confused"),
}


# Adjectives one face could show at once: the paper's two-word STR never swaps an option for
# a near-synonym of either option.
NEAR_SYNONYMS: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in (
    {"happy", "cheerful", "glad", "joyful", "pleased", "delighted", "content", "amused"},
    {"relaxed", "content", "calm"}, {"hopeful", "grateful", "proud"},
    {"angry", "furious", "annoyed"}, {"sad", "miserable", "gloomy", "upset", "lonely"},
    {"fearful", "scared", "nervous", "worried", "anxious"}, {"disgusted", "annoyed"}, {"ashamed", "jealous"},
    {"neutral", "calm", "bored", "thoughtful"}, {"surprised", "puzzled", "confused", "curious"},
))


def opposite_words(adjective: str) -> tuple[str, ...]:
    """STR contrast words: adjectives of the opposite sentiment."""
    return tuple(w for s in OPPOSITE[SENTIMENT[adjective]] for w in STR_WORDS[s])


def near_synonyms(adjective: str) -> frozenset[str]:
    return frozenset({adjective}).union(*(g for g in NEAR_SYNONYMS if adjective in g))


def both_contrasts(a: str, b: str) -> dict[str, tuple[str, ...]]:
    """The paper's two-word STR: each option becomes an adjective of its own opposite sentiment,
    never a near-synonym of either option."""
    return {option: both_options_pool((a, b), opposite_words(option), near_synonyms) for option in (a, b)}


def samples(data: Path | None, files, split: str | None, seed: int, limit: int | None, bad: Bad,
            report: BuildReport, progress=None) -> list[Sample]:
    """Two samples per matched pair of faces of opposite sentiment, one per direction."""
    split = split or "train"
    if data is None:
        raise NoticeError(f"facial-expressions needs --data: a folder holding images/{split}/<emotion>/*.jpg")
    root = Path(data) / "images" / split
    if not root.is_dir():
        raise NoticeError(f"facial-expression images not found: {root}; --data must hold images/{split}/<emotion>/")
    classes: dict[str, list[Path]] = {}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise NoticeError(f"{root} has no emotion folders; expected images/{split}/<emotion>/*.jpg")
    for folder in steps(progress, folders, "facial-expressions: reading folders"):
        adjective = EMOTION_ADJECTIVE.get(folder.name.lower())
        if adjective is None:
            bad("unknown emotion folder", f"folder {folder}: unknown emotion {folder.name!r}; "
                f"use one of {', '.join(sorted(set(EMOTION_ADJECTIVE)))}")
            continue
        classes.setdefault(adjective, []).extend(class_images(folder, bad))

    def contrast_classes(adjective: str) -> list[str]:
        return [a for a in classes if SENTIMENT[a] in OPPOSITE[SENTIMENT[adjective]]]

    rng = random.Random(seed)
    matches = pair_up(classes, contrast_classes, rng, report)
    if limit is not None:
        matches = matches[:limit]
    out = []
    for index, (emotion, image, other, other_image) in enumerate(matches):
        a, b = choice_order(rng, emotion, other)
        out += both_directions(f"{TASK}-{index:06d}", TASK, (emotion, image), (other, other_image),
                               PROMPT.format(a=a, b=b), lambda adj: adj, opposite_words,
                               {"emotions": [emotion, other], "split": split}, both_contrasts(a, b))
    return out
