"""MIT-States: objects in different states, as `images/<adjective noun>/*.jpg`.

A sample asks "is this {noun} {a} or {b}?" about one image; its minimal partner shows the
same noun in a contrasting state. Adjectives are grouped into state categories (as in the
NOTICE paper: shape, colour, texture), and a contrast comes from the same category but
never from the adjective's near-synonyms, which could describe the same picture.
"""

from __future__ import annotations

import random
from pathlib import Path

from notice.tasks.common import Bad, BuildReport, Sample, both_directions, both_options_pool, choice_order
from notice.tasks.common import class_images, pair_up, steps

TASK = "mit-states"
PROMPT = "is this {noun} {a} or {b}?"

STATE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "shape": ("small", "tiny", "large", "huge", "tall", "short", "thick", "thin", "wide", "narrow", "coiled",
              "bent", "curved", "straight", "winding", "folded", "draped", "dented", "cracked", "chipped",
              "broken", "shattered", "splintered", "crushed", "squished", "sliced", "diced", "cut", "cored",
              "peeled", "torn", "ripped", "pierced", "melted", "deflated", "inflated", "empty", "full", "filled",
              "open", "closed", "standing", "upright", "fallen", "toppled"),
    "color": ("bright", "dark", "painted", "unpainted", "engraved", "burnt", "browned", "caramelized", "cooked",
              "raw", "ripe", "unripe", "fresh", "old", "ancient", "new", "modern", "young", "weathered", "rusty",
              "moldy", "clean", "dirty", "grimy", "muddy", "wet", "damp", "dry", "frozen", "thawed", "verdant",
              "wilted", "shiny", "dull", "clear", "murky", "cloudy", "foggy", "sunny", "steaming"),
    "texture": ("crumpled", "crinkled", "wrinkled", "creased", "ruffled", "frayed", "worn", "mossy", "molten",
                "runny", "viscous", "windblown", "eroded", "barren", "pureed", "whipped", "brushed", "scratched",
                "rough", "smooth", "sharp", "blunt", "spilled", "cluttered", "loose", "tight", "heavy",
                "lightweight", "linked", "pressed"),
}

# Groups of adjectives that one picture could show at once: never contrasted with each other.
NEAR_SYNONYMS: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in (
    {"small", "tiny", "short", "thin", "narrow"}, {"large", "huge", "tall", "thick", "wide"},
    {"broken", "cracked", "chipped", "shattered", "splintered", "crushed", "squished", "dented", "scratched"},
    {"sliced", "diced", "cut", "cored", "peeled", "pierced", "torn", "ripped"},
    {"bent", "curved", "coiled", "winding", "folded", "draped"}, {"full", "filled"}, {"standing", "upright"},
    {"fallen", "toppled"}, {"melted", "molten", "runny", "viscous"},
    {"old", "ancient", "weathered", "rusty", "worn", "eroded"}, {"new", "modern", "fresh", "clean", "young"},
    {"burnt", "browned", "caramelized", "cooked"}, {"raw", "unripe", "fresh"},
    {"dirty", "grimy", "muddy", "moldy", "mossy"}, {"wet", "damp", "thawed", "steaming"}, {"dry", "barren", "wilted"},
    {"painted", "bright", "shiny"}, {"unpainted", "dull"}, {"dark", "murky", "cloudy", "foggy"},
    {"clear", "sunny", "bright"}, {"verdant", "mossy", "fresh"},
    {"crumpled", "crinkled", "wrinkled", "creased"}, {"ruffled", "frayed", "worn", "windblown"},
    {"smooth", "brushed"}, {"pureed", "whipped", "molten", "runny"}, {"spilled", "cluttered"},
))

CATEGORY_OF = {adjective: category for category, words in STATE_CATEGORIES.items() for adjective in words}


def near_synonyms(adjective: str) -> frozenset[str]:
    """The adjective and every adjective sharing a near-synonym group with it."""
    return frozenset({adjective}).union(*(g for g in NEAR_SYNONYMS if adjective in g))


def contrasts(adjective: str) -> tuple[str, ...]:
    """Adjectives of the same state category that are not near-synonyms of `adjective`."""
    category = CATEGORY_OF.get(adjective)
    if category is None:
        return ()
    banned = near_synonyms(adjective)
    return tuple(a for a in STATE_CATEGORIES[category] if a not in banned)


def samples(data: Path | None, files, split: str | None, seed: int, limit: int | None, bad: Bad,
            report: BuildReport, progress=None) -> list[Sample]:
    """Two samples per matched pair of images (same noun, contrasting states), one per direction."""
    from notice.errors import NoticeError

    if data is None:
        raise NoticeError("mit-states needs --data: a folder holding images/<adjective noun>/*.jpg")
    root = Path(data) / "images"
    if not root.is_dir():
        raise NoticeError(f"MIT-States images not found: {root}; --data must hold images/<adjective noun>/*.jpg")
    classes: dict[str, list[Path]] = {}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder in steps(progress, folders, "mit-states: reading folders"):
        adjective, _, noun = folder.name.partition(" ")
        if not noun or adjective not in CATEGORY_OF:
            report.skipped["folder without a categorised adjective"] += 1
            continue
        good = class_images(folder, bad)
        if good:
            classes[folder.name] = good

    def contrast_classes(name: str) -> list[str]:
        adjective, _, noun = name.partition(" ")
        return [f"{a} {noun}" for a in contrasts(adjective) if f"{a} {noun}" in classes]

    rng = random.Random(seed)
    matches = pair_up(classes, contrast_classes, rng, report)
    if limit is not None:
        matches = matches[:limit]
    out = []
    for index, (name, image, other_name, other_image) in enumerate(matches):
        adjective, _, noun = name.partition(" ")
        other = other_name.partition(" ")[0]
        a, b = choice_order(rng, adjective, other)
        # the paper's two-word STR draws from every adjective, never a near-synonym of either option
        pool = both_options_pool((a, b), CATEGORY_OF, near_synonyms, noun.split())
        out += both_directions(f"{TASK}-{index:06d}", TASK, (adjective, image), (other, other_image),
                               PROMPT.format(noun=noun, a=a, b=b), lambda adj: CATEGORY_OF[adj], contrasts,
                               {"noun": noun, "states": [adjective, other], "state_category": CATEGORY_OF[adjective]},
                               {a: pool, b: pool})
    return out
