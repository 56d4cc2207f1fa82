"""What every task builder shares: samples, the pairs derived from them, bad-input handling.

A task reads its dataset into Samples: one clean input (image, two-way prompt, right answer)
with its semantic minimal partner image. Every Sample then yields up to five pairs on the
same clean input, so that SMP, both forms of STR and Gaussian noise can be compared sample
by sample.
"""

from __future__ import annotations

import random
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from notice.corrupt.noise import noise_spec
from notice.corrupt.text import replace_words, token_positions, word_span
from notice.errors import NoticeError
from notice.pairs import CORRUPTIONS, Pair

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
T = TypeVar("T")


@dataclass
class Sample:
    """One clean input and its SMP partner; `str_candidates` are the contrast words of the right
    option for STR, `str_both_candidates` those of each option for the paper's two-word form."""

    id: str
    task: str
    clean_image: str
    corrupt_image: str
    prompt: str
    correct: str
    incorrect: str
    category: str  # the balancing unit: SVO role, state category, emotion, colour, shape
    str_candidates: Sequence[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    str_both_candidates: Mapping[str, Sequence[str]] = field(default_factory=dict)  # option word → contrast words
    noise_positions: str = "all"  # image noise: "all" patches, or "object" where a mask is known
    # (asserting, negated) yes/no prompts naming an attribute value ("is a {} shape present?"), where the task has them
    yes_no: tuple[str, str] | None = None

    @property
    def correct_first(self) -> bool:
        return answer_span(self.prompt, self.correct)[0] < answer_span(self.prompt, self.incorrect)[0]


_CHOICE_RE = re.compile(r"(?<![\w-])([\w-]+) or (?:the |a |an )?([\w-]+)(?![\w-])")


def answer_span(prompt: str, answer: str) -> tuple[int, int]:
    """Character span of `answer` among the options of a two-way prompt ("... {a} or [the] {b}?")."""
    matches = list(_CHOICE_RE.finditer(prompt))
    if matches:
        last = matches[-1]
        for group in (1, 2):
            if last.group(group) == answer:
                return last.span(group)
    word_span(prompt, answer)  # absent from the prompt: a one-line error naming both
    raise NoticeError(f"answer word {answer!r} is not one of the options of the prompt {prompt!r}; "
                      "two-way prompts read \"... {a} or {b}?\"")


@dataclass
class BuildReport:
    """Counts of what a build skipped or rejected, by reason."""

    skipped: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)
    str_rejected: Counter = field(default_factory=Counter)  # contrast-word draws rejected, per STR corruption

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": dict(self.pairs), "skipped": dict(self.skipped), "str_rejected": dict(self.str_rejected)}


class Bad:
    """Bad input: stop with one line, or (with --skip-bad) count it under a reason and go on."""

    def __init__(self, skip: bool, report: BuildReport):
        self.skip, self.report = skip, report

    def __call__(self, reason: str, message: str) -> None:
        if not self.skip:
            raise NoticeError(f"{message} (or pass --skip-bad to skip and count such input)")
        self.report.skipped[reason] += 1


def stable_seed(seed: int, key: str) -> int:
    """A per-sample seed that depends only on the run's seed and the sample id."""
    return zlib.crc32(f"{seed}:{key}".encode()) & 0x7FFFFFFF


def derive_pairs(sample: Sample, tokenizer, corruptions: Sequence[str], seed: int,
                 report: BuildReport) -> list[Pair]:
    """The pairs of one sample: its SMP pair, STR pairs (one word or both options swapped), and
    image and text noise on the same clean input."""
    span = _option_span(sample)
    base = dict(sample.metadata, sample=sample.id, category=sample.category, correct_first=sample.correct_first,
                answer_tokens=answer_token_record(tokenizer, sample.prompt, span, sample.correct))
    common = dict(task=sample.task, clean_image=sample.clean_image, clean_prompt=sample.prompt,
                  correct=sample.correct, incorrect=sample.incorrect)
    out = []
    if "image_smp" in corruptions:
        out.append(Pair(id=f"{sample.id}/image_smp", corruption="image_smp", corrupt_image=sample.corrupt_image,
                        corrupt_prompt=sample.prompt, metadata=base, **common))
    for corruption in ("text_str", "text_str_both"):
        if corruption in corruptions:
            swap = _str_swap(sample, tokenizer, corruption, seed, report)
            if swap is not None:
                out.append(Pair(id=f"{sample.id}/{corruption}", corruption=corruption,
                                corrupt_image=sample.clean_image, corrupt_prompt=swap.pop("prompt"),
                                metadata=dict(base, str=swap), **common))
    if "text_str_yesno" in corruptions:
        out += _yes_no_pair(sample, tokenizer, seed, report, base)
    noise_seed = stable_seed(seed, sample.id + "/noise")
    if "image_noise" in corruptions:
        meta = dict(base, noise=noise_spec("vision", sample.noise_positions, noise_seed))
        out.append(Pair(id=f"{sample.id}/image_noise", corruption="image_noise", corrupt_image=sample.clean_image,
                        corrupt_prompt=sample.prompt, metadata=meta, **common))
    if "text_noise" in corruptions:
        meta = dict(base, noise=noise_spec("text", token_positions(tokenizer, sample.prompt, span), noise_seed))
        out.append(Pair(id=f"{sample.id}/text_noise", corruption="text_noise", corrupt_image=sample.clean_image,
                        corrupt_prompt=sample.prompt, metadata=meta, **common))
    for pair in out:
        report.pairs[pair.corruption] += 1
    return out


def _str_swap(sample: Sample, tokenizer, corruption: str, seed: int, report: BuildReport) -> dict[str, Any] | None:
    """The corrupt prompt and STR metadata of one form, or None (counted) when no swap aligns.

    text_str swaps the right option for a contrast word; text_str_both swaps both options, each
    for a word of its own token length (the NOTICE paper's form), never the same word twice."""
    if corruption == "text_str":
        words = [sample.correct]
        pools: list[Sequence[str]] = [[w for w in sample.str_candidates if w not in (sample.correct, sample.incorrect)]]
    else:
        words = [sample.correct, sample.incorrect]
        pools = [sample.str_both_candidates.get(word, ()) for word in words]
    key = "/str" if corruption == "text_str" else "/str_both"
    return _swap_words(tokenizer, corruption, sample.prompt, [answer_span(sample.prompt, w) for w in words], pools,
                       random.Random(stable_seed(seed, sample.id + key)), report)


def _swap_words(tokenizer, corruption: str, prompt: str, spans: list[tuple[int, int]], pools: list[Sequence[str]],
                rng: random.Random, report: BuildReport) -> dict[str, Any] | None:
    """Swap the words at `spans` for aligned words of their pools; the corrupt prompt and STR metadata, or
    None (counted under `corruption`) when no swap aligns."""
    swap, rejected = replace_words(tokenizer, prompt, spans, pools, rng)
    report.str_rejected[corruption] += rejected
    if swap is None:
        reason = ("no two different contrast words of the options' token lengths" if len(spans) > 1 else
                  "no contrast word of equal token length")
        report.skipped[f"{corruption}: {reason}"] += 1
        return None
    one = len(spans) == 1  # the one-word form keeps plain strings, as before
    return {"prompt": swap.prompt, "form": "one" if one else "both", "positions": swap.positions,
            "replaced": swap.replaced[0] if one else swap.replaced,
            "replacement": swap.replacement[0] if one else swap.replacement, "rejected": rejected}


def _yes_no_pair(sample: Sample, tokenizer, seed: int, report: BuildReport, base: dict[str, Any]) -> list[Pair]:
    """STR on a yes/no question about the clean image's own attribute value: "is a red shape present?"
    (yes) against "is a blue shape present?" (no), or the negated form with the answers swapped. The
    clean image decides the answer of both prompts, so the word swap flips a model that compares them.
    Asserting or negated is a seeded choice per sample; selection balances the two."""
    if sample.yes_no is None:
        report.skipped["text_str_yesno: the task has no yes/no question form"] += 1
        return []
    rng = random.Random(stable_seed(seed, sample.id + "/yesno"))
    negated = rng.random() < 0.5
    prompt = sample.yes_no[negated].format(sample.correct)
    swap = _swap_words(tokenizer, "text_str_yesno", prompt, [word_span(prompt, sample.correct)],
                       [[w for w in sample.str_candidates if w != sample.correct]], rng, report)
    if swap is None:
        return []
    correct, incorrect = ("no", "yes") if negated else ("yes", "no")
    corrupt_prompt = swap.pop("prompt")
    meta = {k: v for k, v in base.items() if k != "correct_first"}  # no options: the polarity is balanced instead
    meta.update(negated=negated, str=dict(swap, form="yes/no"),
                answer_tokens=answer_token_record(tokenizer, prompt, None, correct))
    return [Pair(id=f"{sample.id}/text_str_yesno", task=sample.task, corruption="text_str_yesno",
                 clean_image=sample.clean_image, corrupt_image=sample.clean_image, clean_prompt=prompt,
                 corrupt_prompt=corrupt_prompt, correct=correct, incorrect=incorrect, metadata=meta)]


def answer_token_record(tokenizer, prompt: str, span: tuple[int, int] | None, answer: str) -> dict[str, Any]:
    """Where the right answer sits among the question's tokens, recorded while the model's tokenizer
    is at hand, so that the NOTICE paper's head rule (notice.analysis.paper_rule) reads results
    tables without loading a model.

    tokens: the question tokenized alone (special tokens included); question: the [start, end) of
    its non-special tokens; positions: the tokens covering the answer word's span; first_piece:
    the answer's first token when tokenized alone; code_position: the index the research code reads,
    the first question token (special tokens excluded, lower-cased) that contains that piece."""
    encoded = tokenizer(prompt, return_special_tokens_mask=True)
    body = [i for i, special in enumerate(encoded["special_tokens_mask"]) if not special]
    code_piece = tokenizer.tokenize(answer.strip().lower())[0]
    code_tokens = tokenizer.tokenize(prompt.strip().lower())
    return {"tokens": tokenizer.convert_ids_to_tokens(encoded["input_ids"]),
            "question": [body[0], body[-1] + 1] if body else [0, 0],
            "positions": token_positions(tokenizer, prompt, span) if span is not None else [],
            "first_piece": tokenizer.tokenize(answer)[0],
            "code_position": next((i for i, token in enumerate(code_tokens) if code_piece in token), None)}


def _option_span(sample: Sample) -> tuple[int, int]:
    """The correct answer's span among the prompt's options (the words STR and text noise touch)."""
    return answer_span(sample.prompt, sample.correct)


def check_corruptions(corruptions: Iterable[str]) -> list[str]:
    chosen = [c.strip() for c in corruptions if c.strip()]
    unknown = [c for c in chosen if c not in CORRUPTIONS]
    if unknown or not chosen:
        raise NoticeError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'}: use {', '.join(CORRUPTIONS)}")
    return chosen


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name so that runs are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def readable_image(path: Path) -> bool:
    """Whether PIL can decode the file (checked up front so that no pair points at a broken image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def class_images(folder: Path, bad: "Bad") -> list[Path]:
    """The readable images of one class folder; an empty folder or a broken image goes to `bad`."""
    images = image_files(folder)
    if not images:
        bad("empty class folder", f"class folder {folder} holds no images; add images or remove the folder")
        return []
    good = []
    for image in images:
        if readable_image(image):
            good.append(image)
        else:
            bad("unreadable image", f"cannot read image {image}; replace or delete the file")
    return good


def pair_up(classes: dict[str, list[Path]], contrasts: Callable[[str], Sequence[str]], rng: random.Random,
            report: BuildReport) -> list[tuple[str, Path, str, Path]]:
    """Match images of contrasting classes one to one, each image used at most once.

    Visits images in a seeded order and gives each unmatched image a partner from a seeded
    choice among the contrasting classes that still have unmatched images."""
    pools = {name: rng.sample(paths, len(paths)) for name, paths in sorted(classes.items())}
    order = [(name, path) for name, paths in pools.items() for path in paths]
    rng.shuffle(order)
    used: set[Path] = set()
    matches = []
    for name, path in order:
        if path in used:
            continue
        open_classes = [c for c in contrasts(name) if any(p not in used for p in pools.get(c, []))]
        if not open_classes:
            report.skipped["no unmatched image of a contrasting class"] += 1
            continue
        other = rng.choice(sorted(open_classes))
        partner = next(p for p in pools[other] if p not in used)
        used.update((path, partner))
        matches.append((name, path, other, partner))
    return matches


def both_options_pool(options: Sequence[str], vocabulary: Iterable[str], related: Callable[[str], Iterable[str]],
                      question_words: Iterable[str] = ()) -> tuple[str, ...]:
    """Contrast words for the paper's two-word STR: the task's vocabulary without the options,
    their near-synonyms (`related`) and the question's other words."""
    banned = set(options) | set(question_words)
    for option in options:
        banned |= set(related(option))
    return tuple(w for w in vocabulary if w not in banned)


def choice_order(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    return (a, b) if rng.random() < 0.5 else (b, a)


def both_directions(sample_id: str, task: str, first: tuple[str, Path], second: tuple[str, Path], prompt: str,
                    category_of: Callable[[str], str], candidates_of: Callable[[str], Sequence[str]],
                    metadata: dict[str, Any], both_candidates: Mapping[str, Sequence[str]]) -> list[Sample]:
    """Two samples sharing one prompt: each image clean once with the other as its SMP partner,
    so the right answer stands first in one and second in the other."""
    out = []
    for direction, (answer, image), (other, other_image) in (("forward", first, second), ("reverse", second, first)):
        out.append(Sample(id=f"{sample_id}-{direction}", task=task, clean_image=str(image),
                          corrupt_image=str(other_image), prompt=prompt, correct=answer, incorrect=other,
                          category=category_of(answer), str_candidates=candidates_of(answer),
                          metadata=dict(metadata, direction=direction), str_both_candidates=both_candidates))
    return out


def steps(progress, items: Sequence[T], description: str) -> Iterator[T]:
    """Iterate with a rich progress bar when one is given."""
    if progress is None:
        yield from items
        return
    task = progress.add_task(description, total=len(items))
    for item in items:
        yield item
        progress.advance(task)


class DerivedFiles:
    """Derived images and masks: written under a temporary folder, recorded under their final
    folder `<out stem>_files` beside the pairs file, published together with the pairs."""

    def __init__(self, out: Path):
        self.final = out.parent / f"{out.stem}_files"
        self.tmp = out.parent / f".{out.stem}_files.part"
        self.used = False

    def __enter__(self) -> "DerivedFiles":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # published already, or abandoned

    def path(self, name: str) -> tuple[Path, Path]:
        """(where to write now, the path to record in the pairs)."""
        self.used = True
        write = self.tmp / name
        write.parent.mkdir(parents=True, exist_ok=True)
        return write, self.final / name

    def publish(self, write_pairs_file: Callable[[], Any]) -> None:
        """Move the folder into place and write the pairs file; on failure restore what was there."""
        backup = self.final.parent / f".{self.final.name}.old"
        shutil.rmtree(backup, ignore_errors=True)
        if self.used:
            if self.final.exists():
                self.final.rename(backup)
            self.tmp.rename(self.final)
        try:
            write_pairs_file()
        except BaseException:
            if self.used:
                shutil.rmtree(self.final, ignore_errors=True)
                if backup.exists():
                    backup.rename(self.final)
            raise
        shutil.rmtree(backup, ignore_errors=True)
