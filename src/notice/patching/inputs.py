"""From a Pair to what the model receives: its clean and corrupt runs and their baseline metrics.

Selection and patching both build runs here, so they see the same corrupt inputs (a noise pair's
noise included) through the same adapter calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from notice.errors import NoticeError
from notice.io import load_image, load_mask
from notice.models.base import ModelAdapter, Run
from notice.pairs import Pair
from notice.patching.metrics import DIRECTIONS, Baseline, answer_ids, baseline


def pair_noise(adapter: ModelAdapter, pair: Pair, clean: Run) -> dict[str, Any] | None:
    """A noise pair's spec with positions in the model's embeddings; None for other pairs."""
    if not pair.corruption.endswith("_noise"):
        return None
    spec = pair.metadata.get("noise")
    if not spec:
        raise NoticeError(f"pair {pair.id}: a {pair.corruption} pair needs metadata['noise'] (see corrupt/noise.py)")
    mask_path = pair.metadata.get("clean_mask")
    mask = load_mask(mask_path) if spec["positions"] == "object" and mask_path and Path(mask_path).is_file() else None
    try:
        return adapter.resolve_noise(spec, pair.clean_prompt, clean, mask)
    except NoticeError as error:
        raise NoticeError(f"pair {pair.id}: {error}") from error


def pair_runs(adapter: ModelAdapter, pair: Pair) -> tuple[Run, Run]:
    """The clean and the corrupt Run of a pair (noise pairs: the clean input plus seeded embedding noise)."""
    try:
        clean_image = load_image(pair.clean_image)
        corrupt_image = clean_image if pair.corrupt_image == pair.clean_image else load_image(pair.corrupt_image)
        clean, corrupt = adapter.runs_for(clean_image, corrupt_image, pair.clean_prompt, pair.corrupt_prompt)
    except NoticeError as error:
        raise NoticeError(f"pair {pair.id}: {error}") from error
    noise = pair_noise(adapter, pair, clean)
    return clean, (corrupt if noise is None else Run(corrupt.inputs, [noise]))


def noisy_run(adapter: ModelAdapter, pairs: Sequence[Pair], images: Sequence) -> Run:
    """One batched Run of the corrupt inputs of noise pairs of one token length (images: their clean images)."""
    inputs = adapter.prepare(images, [p.clean_prompt for p in pairs])
    return Run(inputs, [pair_noise(adapter, p, Run(adapter.input_row(inputs, i))) for i, p in enumerate(pairs)])


def pair_baseline(adapter: ModelAdapter, pair: Pair, clean_logits, corrupt_logits) -> Baseline:
    correct, incorrect, flags = answer_ids(adapter.answer_token_ids, pair.correct, pair.incorrect)
    return baseline(clean_logits, corrupt_logits, correct, incorrect, flags)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise NoticeError(f"unknown direction {direction!r}: use denoise (clean into corrupt, as in the paper) "
                          "or noise (corrupt into clean)")
    return direction
