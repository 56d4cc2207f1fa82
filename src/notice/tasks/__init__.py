"""Tasks: one module per dataset, each reading its own on-disk format; `build_pairs` writes their Pairs."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from notice import __version__
from notice.errors import NoticeError
from notice.io import no_new_empty_folders
from notice.models import PromptBudget
from notice.pairs import DEFAULT_CORRUPTIONS, STR_FORMS, Pair, write_pairs


def _task_readers() -> dict[str, Callable]:
    from notice.tasks import easy_vqa, facial_expressions, mit_states, svo_probes

    def easy(kind: str, data, files, split, *args, **kwargs):
        return easy_vqa.smp_samples(kind, split or "test", Path(data) if data else None, files, *args, **kwargs)

    return {"svo-probes": svo_probes.samples, "mit-states": mit_states.samples,
            "facial-expressions": facial_expressions.samples,
            "easyvqa-color": partial(easy, "color"), "easyvqa-shape": partial(easy, "shape")}


TASKS = ("svo-probes", "mit-states", "facial-expressions", "easyvqa-color", "easyvqa-shape")


def build_pairs(task: str, out: str | Path, tokenizer, data: str | Path | None = None, split: str | None = None,
                seed: int = 0, corruptions: Sequence[str] = DEFAULT_CORRUPTIONS, limit: int | None = None,
                skip_bad: bool = False, progress=None, budget: PromptBudget | None = None, str_form: str = "one"):
    """Read a task's data, derive its pairs and write them to `out` (Parquet) with derived images
    and masks in `<out stem>_files/`; returns the BuildReport. Nothing is written on error.

    `tokenizer` is the model's own (fast) tokenizer: STR and text-noise positions depend on it.
    With `budget`, a sample whose prompt is longer than the model reads is bad input, named by its id
    (all of a sample's pairs share its prompt's length: STR keeps the token count).
    `str_form` says what "text_str" makes: "one" (the right option swapped) or "both" (both
    options swapped, the NOTICE paper's form, stored as its own corruption text_str_both)."""
    from notice.tasks.common import Bad, BuildReport, DerivedFiles, check_corruptions, derive_pairs, steps

    readers = _task_readers()
    if task not in readers:
        raise NoticeError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if data is not None and not Path(data).is_dir():
        raise NoticeError(f"data folder not found: {data}")
    if limit is not None and limit < 1:
        raise NoticeError(f"--limit must be at least 1, not {limit}")
    if str_form not in STR_FORMS:
        raise NoticeError(f"unknown STR form {str_form!r}: use {' or '.join(STR_FORMS)}")
    chosen = [STR_FORMS[str_form] if c == "text_str" else c for c in check_corruptions(corruptions)]
    out = Path(out)
    report = BuildReport()
    bad = Bad(skip_bad, report)
    with no_new_empty_folders(out.parent), DerivedFiles(out) as files:
        samples = readers[task](data, files, split, seed, limit, bad, report, progress)
        pairs: list[Pair] = []
        for sample in steps(progress, samples, f"{task}: pairs"):
            length = budget.excess(sample.prompt) if budget is not None else None
            if budget is not None and length is not None:
                bad("prompt longer than the model reads",
                    f"sample {sample.id}: {budget.describe(sample.prompt, length)}; use a model that reads longer prompts")
                continue
            try:
                pairs += derive_pairs(sample, tokenizer, chosen, seed, report)
            except NoticeError as error:
                bad("answer not an option of its prompt", f"sample {sample.id}: {error}")
        if not pairs:
            raise NoticeError(f"no pairs made from {data or 'the installed data'} for {task}: "
                              f"skipped {dict(report.skipped) or 'nothing'}; check the data folder")
        provenance = {"version": __version__, "task": task, "seed": seed, "model": budget.model if budget else None,
                      "corruptions": list(chosen), "limit": limit, "split": split,
                      "data": str(Path(data).resolve()) if data else None}
        files.publish(lambda: write_pairs(pairs, out, provenance))
    return report
