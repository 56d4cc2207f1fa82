"""From a Pair to what patching needs: the clean and corrupt runs and their baseline metrics."""

from __future__ import annotations

from notice.corrupt.noise import resolve_positions
from notice.errors import NoticeError
from notice.io import load_image
from notice.models.base import Patchable, Run
from notice.pairs import Pair
from notice.patching.metrics import DIRECTIONS, Baseline, answer_ids, baseline


def pair_runs(adapter: Patchable, pair: Pair) -> tuple[Run, Run]:
    """The clean and the corrupt Run of a pair (noise pairs: the clean input plus seeded embedding noise)."""
    noise = None
    if pair.corruption.endswith("_noise"):
        noise = pair.metadata.get("noise")
        if not noise:
            raise NoticeError(f"pair {pair.id}: a {pair.corruption} pair needs metadata['noise'] (see corrupt/noise.py)")
        noise = dict(noise, positions=resolve_positions(adapter, pair))  # as selection resolves them
    try:
        clean_image = load_image(pair.clean_image)
        corrupt_image = clean_image if pair.corrupt_image == pair.clean_image else load_image(pair.corrupt_image)
        return adapter.runs_for(clean_image, corrupt_image, pair.clean_prompt, pair.corrupt_prompt, noise)
    except NoticeError as error:
        raise NoticeError(f"pair {pair.id}: {error}") from error


def pair_baseline(adapter, pair: Pair, clean_logits, corrupt_logits) -> Baseline:
    correct, incorrect, flags = answer_ids(adapter.answer_token_ids, pair.correct, pair.incorrect)
    return baseline(clean_logits, corrupt_logits, correct, incorrect, flags)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise NoticeError(f"unknown direction {direction!r}: use denoise (clean into corrupt, as in the paper) "
                          "or noise (corrupt into clean)")
    return direction
