"""Small fixtures in each dataset's real on-disk layout, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import helpers

SVO_ROWS = [  # sentence, pos triplet, neg triplet, which role differs
    ("A man riding a horse.", "man,ride,horse", "woman,ride,horse", "subj"),
    ("A dog sitting on grass.", "dog,sit,grass", "dog,lie,grass", "verb"),
    ("A girl holding a cat.", "girl,hold,cat", "girl,hold,dog", "obj"),
    ("A boy kicking a ball.", "boy,kick,ball", "girl,kick,ball", "subj"),
    ("A woman eating an apple.", "woman,eat,apple", "woman,cut,apple", "verb"),
    ("A child throwing a ball.", "child,throw,ball", "child,throw,frisbee", "obj"),
]


def svo_probes(root: Path, rows=SVO_ROWS, size: int = 48) -> Path:
    """svo_probes.csv with the dataset's columns, and images/<image id>.jpg for every image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, (sentence, pos, neg, role) in enumerate(rows):
        pos_id, neg_id = f"p{index:03d}", f"n{index:03d}"
        for image_id, seed in ((pos_id, 2 * index), (neg_id, 2 * index + 1)):
            helpers.noise_image(size, seed).save(root / "images" / f"{image_id}.jpg")
        records.append({"sentence": sentence, "pos_triplet": pos, "neg_triplet": neg,
                        "subj_neg": role == "subj", "verb_neg": role == "verb", "obj_neg": role == "obj",
                        "pos_image_id": pos_id, "neg_image_id": neg_id,
                        "pos_url": f"http://example.org/{pos_id}.jpg", "neg_url": f"http://example.org/{neg_id}.jpg"})
    pd.DataFrame(records).to_csv(root / "svo_probes.csv", index=False)
    return root


MIT_FOLDERS = {"sliced apple": 3, "whole apple": 1, "large apple": 2, "small apple": 3, "tiny apple": 1,
               "old car": 2, "new car": 2, "rusty car": 1, "wet dog": 2, "dry dog": 2, "sleepy dog": 1}


def mit_states(root: Path, folders: dict[str, int] = MIT_FOLDERS, size: int = 40) -> Path:
    """images/<adjective noun>/*.jpg; a count of 0 makes an empty class folder."""
    seed = 100
    for name, count in folders.items():
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            helpers.noise_image(size, seed).save(folder / f"{i}.jpg")
            seed += 1
    return root


FER_COUNTS = {"angry": 2, "disgust": 1, "fear": 2, "happy": 6, "neutral": 2, "sad": 2, "surprise": 1}


def facial_expressions(root: Path, counts: dict[str, int] = FER_COUNTS, split: str = "train", size: int = 48) -> Path:
    """images/<split>/<emotion>/*.jpg, grey faces of FER's 48x48 size."""
    seed = 500
    for emotion, count in counts.items():
        folder = root / "images" / split / emotion
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            helpers.noise_image(size, seed).convert("L").save(folder / f"{emotion}_{i}.jpg")
            seed += 1
    return root
