"""Checks of user input at the boundary, run before any model is loaded or any file is written.

A check takes the name the user knows a value by (`--top`, `select.threshold`, `tasks[0].limit`)
and the value, and returns the value, normalised, or raises a one-line NoticeError that names
both and says what to write instead. A command lists its checks as a table of
(name, value, check) rows and runs them with `check_all`, so a new option is one more row.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from notice.errors import NoticeError

Check = Callable[[str, Any], Any]


def check_all(rows: Iterable[tuple[str, Any, Check]]) -> list[Any]:
    """Run every (name, value, check) row in order; returns the checked values."""
    return [check(name, value) for name, value, check in rows]


# ------------------------------------------------------------------ plain values
def whole(minimum: int | None = None, optional: bool = False) -> Check:
    """A whole number (not a bool, not a float), at least `minimum`; None passes when `optional`."""
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise NoticeError(f"{name} {value!r} is not a whole number: write one such as {max(minimum or 0, 1)}")
        if minimum is not None and value < minimum:
            raise NoticeError(f"{name} must be at least {minimum}, not {value}")
        return value
    return check


def number(minimum: float | None = None) -> Check:
    """A real number (ints accepted), at least `minimum`."""
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise NoticeError(f"{name} {value!r} is not a number: write one such as {minimum or 0}")
        if minimum is not None and value < minimum:
            raise NoticeError(f"{name} must be {minimum} or more, not {value}")
        return float(value)
    return check


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NoticeError(f"{name} {value!r} is not true or false")
    return value


def text(optional: bool = False) -> Check:
    """A non-empty string; None passes when `optional`."""
    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise NoticeError(f"{name} {value!r} must be a non-empty text")
        return value
    return check


def one_of(choices: Sequence[str], what: str = "value") -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise NoticeError(f"{name}: unknown {what} {value!r}; use one of {', '.join(choices)}")
        return value
    return check


def names(choices: Sequence[str] | None = None, what: str = "name", comma_text: bool = False) -> Check:
    """A list of names, at least one; with `comma_text`, also a comma-separated string (a command-line
    option), else a string is refused (a YAML value that should be a list)."""
    def check(name: str, value: Any) -> list[str]:
        items = value.split(",") if isinstance(value, str) and comma_text else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise NoticeError(f"{name} must be a list of {what}s, e.g. [{value if isinstance(value, str) else '...'}], "
                              f"not {value!r}")
        items = [i.strip() for i in items if i.strip()]
        if not items:
            raise NoticeError(f"{name} names no {what}: give at least one"
                              + (f" of {', '.join(choices)}" if choices else ""))
        unknown = [i for i in items if choices is not None and i not in choices]
        if unknown:
            raise NoticeError(f"{name} has unknown {what}(s) {', '.join(unknown)}: use {', '.join(choices or ())}")
        return items
    return check


def head_rules(name: str, value: Any) -> list[str]:
    """Head-selection rules of the report: one name, a comma-separated text or a list of names."""
    from notice.analysis.paper_rule import check_rules

    return check_rules([value] if isinstance(value, str) else value, name)


def site_patterns(name: str, value: Any) -> list[str]:
    """Site patterns (syntax only: the model's streams are checked once it is loaded)."""
    from notice.patching.sites import check_pattern

    patterns = names(what="site pattern", comma_text=True)(name, value)
    for pattern in patterns:
        check_pattern(pattern)
    return patterns


def memory(name: str, value: Any) -> Any:
    """A memory size such as 8GB or 512MB (or a number of bytes), more than nothing; returned as given."""
    from notice.patching.engine import parse_memory

    try:
        size = parse_memory(value if isinstance(value, (str, int)) and not isinstance(value, bool) else str(value))
    except NoticeError as error:
        raise NoticeError(f"{name}: {error}") from error
    if size <= 0:
        raise NoticeError(f"{name} {value!r} leaves no memory for patching: give e.g. 4GB")
    return value


def dtype(name: str, value: Any) -> str:
    from notice.models.base import DTYPES

    return one_of(sorted(DTYPES), "dtype")(name, value)


_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def device(name: str, value: Any) -> str:
    """A torch device that exists on this machine: cpu, cuda, cuda:N (N below the GPU count) or mps."""
    import torch

    match = _DEVICE_RE.fullmatch(str(value).strip())
    if not match:
        raise NoticeError(f"{name} {value!r} is not a device: use cpu, cuda, cuda:N or mps")
    kind, index = match[1], int(match[2] or 0)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise NoticeError(f"{name} {value}: no CUDA device here ({why}); use {name} cpu")
        if index >= count:
            raise NoticeError(f"{name} {value}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise NoticeError(f"{name} {value}: Apple's MPS is not available here; use {name} cpu")
    return str(value).strip()


# ---------------------------------------------------------------------- paths
def existing_file(name: str, value: Any) -> Path:
    path = Path(value)
    if not path.is_file():
        raise NoticeError(f"{name} {path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    return path


def existing_folder(name: str, value: Any) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise NoticeError(f"{name} {path}: {'is a file, not a folder' if path.exists() else 'folder not found'}")
    return path


def output_file(name: str, value: Any) -> Path:
    """A file to (over)write: not a folder, under a folder that exists or can be made, writable."""
    path = Path(value)
    if path.is_dir():
        raise NoticeError(f"{name} {path} is a folder: give a file path, e.g. {path / 'out.parquet'}")
    _writable(name, path.parent)
    return path


def output_folder(name: str, value: Any) -> Path:
    """A folder to write into: not a file, under a folder that exists or can be made, writable."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise NoticeError(f"{name} {path} is a file: give a folder path (it is made if missing)")
    _writable(name, path)
    return path


def _writable(name: str, folder: Path) -> None:
    """The nearest existing folder at or above `folder` must be a folder we may write into."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NoticeError(f"{name} {folder}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NoticeError(f"{name} {folder}: no permission to write in {existing}; choose another place")


# --------------------------------------------------------------- model inputs
FIX_PAIRS = "run `notice select` with this model (it drops such pairs) or shorten the prompt"


def prompts_fit(adapter, inputs: Sequence, fix: str = FIX_PAIRS) -> None:
    """Every question, or pair (both prompts, of one length), fits the positions the model reads; else
    one line naming the first that does not, and `fix` (selection drops pairs too long; patching needs
    every pair readable, so it checks them all before the first result is written)."""
    from notice.models import PromptBudget

    budget = PromptBudget.of(adapter)
    for row, item in enumerate(inputs, start=1):
        prompts = [item] if isinstance(item, str) else [item.clean_prompt, item.corrupt_prompt]
        where = "" if isinstance(item, str) else f"pair {item.id} (row {row}): "
        for prompt in prompts:
            length = budget.excess(prompt)
            if length is not None:
                raise NoticeError(f"{where}{budget.describe(prompt, length)}; {fix}")
        lengths = {budget.length(prompt) for prompt in prompts}
        if len(lengths) > 1:
            raise NoticeError(f"{where}its clean and corrupt prompts are {' and '.join(map(str, sorted(lengths)))} "
                              f"tokens for {budget.model}; a pair needs one length: make the pairs with "
                              f"--model {budget.model}")
