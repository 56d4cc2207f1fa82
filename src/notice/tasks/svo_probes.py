"""SVO-Probes: `svo_probes.csv` plus a folder `images/` of the downloaded images, named by image id.

Each row pairs a positive image (its triplet, e.g. man,ride,horse) with a negative image that
differs in exactly one role (subject, verb or object). Both directions become samples with
one two-way prompt about that role; STR swaps the right word (or, in the paper's form, both
options) for other words of the same role from the dataset (verbs in the same -ing inflection),
never a word of the question's triplets.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

from notice.errors import NoticeError
from notice.tasks.common import IMAGE_SUFFIXES, Bad, BuildReport, Sample, readable_image, steps

TASK = "svo-probes"
COLUMNS = ("sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg",
           "pos_image_id", "neg_image_id", "pos_url", "neg_url")
ROLES = ("subject", "verb", "object")
NEG_COLUMN = {"subject": "subj_neg", "verb": "verb_neg", "object": "obj_neg"}
PROMPTS = {
    "subject": "is the {a} or the {b} {verb} the {object}?",
    "verb": "is the {subject} {a} or {b} the {object}?",
    "object": "is the {subject} {verb} the {a} or the {b}?",
}
_IRREGULAR_ING = {"be": "being", "see": "seeing", "flee": "fleeing", "agree": "agreeing", "dye": "dyeing",
                  "tie": "tying", "lie": "lying", "die": "dying", "ski": "skiing", "canoe": "canoeing"}
_DOUBLE_FINAL = {"sit", "run", "swim", "cut", "hit", "get", "put", "dig", "jog", "shop", "stop", "hug", "grab",
                 "drag", "nap", "clap", "chop", "drop", "skip", "slip", "spin", "win", "plan", "pat", "rub",
                 "beg", "set", "bet", "wag", "trim", "tip", "hop", "mop", "pet", "knit", "ship", "strip", "zip",
                 "step", "wrap", "tap", "grin", "scrub", "stir", "bat", "fit", "let", "shut", "chat", "plug"}


def ing_form(verb: str) -> str:
    """The -ing form of a verb lemma (SVO-Probes stores lemmas: ride → riding, sit → sitting)."""
    verb = verb.strip().lower()
    if verb.endswith("ing") and len(verb) > 5:
        return verb
    if verb in _IRREGULAR_ING:
        return _IRREGULAR_ING[verb]
    if verb in _DOUBLE_FINAL:
        return verb + verb[-1] + "ing"
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) and len(verb) > 2:
        return verb[:-1] + "ing"
    return verb + "ing"


def parse_triplet(value: object) -> tuple[str, str, str] | None:
    """A (subject, verb, object) triplet from "man,ride,horse" or "['man,ride,horse']"; None if malformed."""
    text = str(value).strip() if value is not None and not pd.isna(value) else ""
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        text = str(items[0]) if isinstance(items, list) and items else ""
    words = [w.strip().lower() for w in text.split(",")]
    if len(words) != 3 or not all(words) or any(" " in w or "'" in w for w in words):
        return None
    return words[0], words[1], words[2]


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def samples(data: Path | None, files, split: str | None, seed: int, limit: int | None, bad: Bad,
            report: BuildReport, progress=None) -> list[Sample]:
    """Two samples per usable row: the positive image clean with the negative as partner, and the reverse."""
    if data is None:
        raise NoticeError("svo-probes needs --data: a folder holding svo_probes.csv and images/<image id>.jpg")
    csv = Path(data) / "svo_probes.csv"
    if not csv.is_file():
        raise NoticeError(f"SVO-Probes table not found: {csv}; put svo_probes.csv in the --data folder")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as error:
        raise NoticeError(f"cannot read {csv}: {error.__class__.__name__}; it must be the SVO-Probes CSV") from error
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise NoticeError(f"{csv} lacks column(s) {', '.join(missing)}; use the SVO-Probes CSV with columns "
                          f"{', '.join(COLUMNS)}")
    folder = Path(data) / "images"
    if not folder.is_dir():
        raise NoticeError(f"SVO-Probes images not found: {folder}; download them into images/<image id>.jpg")
    images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    rows = table.to_dict("records")
    if limit is not None:
        rows = rows[:limit]

    # STR contrast words: every word the dataset uses in each role (verbs inflected)
    vocabulary: dict[str, set[str]] = {role: set() for role in ROLES}
    for row in rows:
        for triplet in (parse_triplet(row["pos_triplet"]), parse_triplet(row["neg_triplet"])):
            if triplet:
                for role, word in zip(ROLES, triplet):
                    vocabulary[role].add(ing_form(word) if role == "verb" else word)
    checked: dict[str, bool] = {}
    out = []
    for number, row in enumerate(steps(progress, rows, "svo-probes: rows"), start=2):  # line 1 is the header
        where = f"{csv} row {number}"
        pos, neg = parse_triplet(row["pos_triplet"]), parse_triplet(row["neg_triplet"])
        if pos is None or neg is None:
            bad("malformed triplet", f"{where}: triplets must read subject,verb,object "
                f"(got {row['pos_triplet']!r} and {row['neg_triplet']!r}); fix or delete the row")
            continue
        roles = [r for r in ROLES if _flag(row[NEG_COLUMN[r]])]
        differing = [r for r, p, n in zip(ROLES, pos, neg) if p != n]
        if len(roles) != 1 or differing != roles:
            bad("ambiguous negative", f"{where}: exactly one of subj_neg, verb_neg, obj_neg must be true and "
                "name the one role where the triplets differ; fix or delete the row")
            continue
        role = roles[0]
        paths = []
        for column in ("pos_image_id", "neg_image_id"):
            image_id = str(row[column]).strip()
            path = images.get(image_id)
            if path is None:
                bad("missing image", f"{where}: image {image_id!r} not found in {folder}; download it as "
                    f"{folder}/{image_id}.jpg")
                break
            if path.name not in checked:
                checked[path.name] = readable_image(path)
            if not checked[path.name]:
                bad("unreadable image", f"{where}: cannot read image {path}; download it again")
                break
            paths.append(path)
        if len(paths) != 2:
            continue
        index = ROLES.index(role)
        words = {r: (ing_form(w) if r == "verb" else w) for r, w in zip(ROLES, pos)}
        right, wrong = words[role], (ing_form(neg[index]) if role == "verb" else neg[index])
        template = PROMPTS[role]
        # one prompt per row; its option order alternates row by row, and the two directions
        # put the right answer first in one and second in the other
        a, b = (right, wrong) if number % 2 == 0 else (wrong, right)
        prompt = template.format(a=a, b=b, **{r: w for r, w in words.items() if r != role})
        own = set(words.values()) | {wrong}
        candidates = sorted(vocabulary[role] - own)
        meta = {"role": role, "row": number, "pos_triplet": list(pos), "neg_triplet": list(neg),
                "sentence": row["sentence"], "pos_image_id": row["pos_image_id"],
                "neg_image_id": row["neg_image_id"]}
        for direction, (answer, other), (clean, corrupt) in (("forward", (right, wrong), paths),
                                                             ("reverse", (wrong, right), paths[::-1])):
            out.append(Sample(id=f"{TASK}-{number:06d}-{direction}", task=TASK, clean_image=str(clean),
                              corrupt_image=str(corrupt), prompt=prompt, correct=answer, incorrect=other,
                              category=role, str_candidates=candidates,
                              metadata=dict(meta, direction=direction),
                              str_both_candidates={right: candidates, wrong: candidates}))
    return out
