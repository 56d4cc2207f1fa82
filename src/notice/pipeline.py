"""The whole job from a config: pairs → selection → patching → analysis → report.

Every step writes its output under the run folder and is skipped when that output exists, so a
killed run resumes where it stopped (patching resumes per pair through the results store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from notice.analysis.paper_rule import check_rules
from notice.errors import NoticeError
from notice.models import DEFAULT_MODEL
from notice.pairs import CORRUPTIONS

DEFAULT_SITES = ("text.*.layer", "text.*.self_attn", "text.*.cross_attn", "text.*.mlp", "text.*.cross_attn.head*")


@dataclass
class TaskSpec:
    task: str
    data: str | None = None
    split: str | None = None
    corruptions: tuple[str, ...] = ("image_smp", "text_str")
    limit: int | None = None


@dataclass
class RunConfig:
    out: Path
    tasks: list[TaskSpec]
    model: str = DEFAULT_MODEL
    title: str = "notice report"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threshold: float = 0.0
    max_per_cell: int | None = None
    balance: bool = True
    sites: tuple[str, ...] = DEFAULT_SITES
    direction: str = "denoise"
    max_memory: str = "8GB"
    min_conditions: int | None = None
    top_k: int = 10
    rule: tuple[str, ...] = ("default",)  # head-selection rules of the report (notice.analysis.paper_rule)
    extra: dict[str, Any] = field(default_factory=dict)


_TOP_KEYS = {"model", "out", "title", "seed", "device", "dtype", "tasks", "select", "patch", "report"}
_SECTION_KEYS = {"select": {"threshold", "max_per_cell", "balance"},
                 "patch": {"sites", "direction", "max_memory"},
                 "report": {"min_conditions", "top_k", "rule"}}
_TASK_KEYS = {"task", "data", "split", "corruptions", "limit"}


def load_config(path: str | Path, out: str | Path | None = None) -> RunConfig:
    """Read a run config (YAML); unknown keys and bad values are one-line errors naming them."""
    path = Path(path)
    if not path.is_file():
        raise NoticeError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise NoticeError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
    return config_from_dict(raw, str(path), base=path.parent, out=out)


def config_from_dict(raw: dict, source: str, base: Path = Path("."), out: str | Path | None = None) -> RunConfig:
    if not isinstance(raw, dict):
        raise NoticeError(f"{source}: the config must be a mapping of keys to values")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise NoticeError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_TOP_KEYS))}")
    flat: dict[str, Any] = {k: raw[k] for k in ("model", "title", "seed", "device", "dtype") if k in raw}
    for section, keys in _SECTION_KEYS.items():
        values = raw.get(section) or {}
        bad = set(values) - keys
        if bad:
            raise NoticeError(f"{source}: unknown key(s) {', '.join(sorted(bad))} under {section}; "
                              f"valid: {', '.join(sorted(keys))}")
        flat.update(values)
    for key in ("sites", "rule"):  # one value or a list
        if key in flat:
            flat[key] = tuple([flat[key]] if isinstance(flat[key], str) else flat[key])
    if "rule" in flat:
        try:
            flat["rule"] = tuple(check_rules(flat["rule"]))
        except NoticeError as error:
            raise NoticeError(f"{source}: report: {error}") from error
    tasks = raw.get("tasks")
    if not tasks:
        raise NoticeError(f"{source}: list at least one entry under tasks (e.g. - task: easyvqa-color)")
    specs = []
    for i, entry in enumerate(tasks):
        entry = {"task": entry} if isinstance(entry, str) else entry
        bad = set(entry) - _TASK_KEYS
        if bad or "task" not in entry:
            raise NoticeError(f"{source}: tasks[{i}] needs a task name and only {', '.join(sorted(_TASK_KEYS))}")
        corruptions = tuple(entry.get("corruptions") or TaskSpec.corruptions)
        wrong = [c for c in corruptions if c not in CORRUPTIONS]
        if wrong:
            raise NoticeError(f"{source}: tasks[{i}] has unknown corruption(s) {', '.join(wrong)}; "
                              f"use {', '.join(CORRUPTIONS)}")
        data = entry.get("data")
        specs.append(TaskSpec(entry["task"], str(base / data) if data else None, entry.get("split"), corruptions,
                              entry.get("limit")))
    target = out or raw.get("out")
    if not target:
        raise NoticeError(f"{source}: say where results go with out: FOLDER (or --out)")
    return RunConfig(out=Path(target), tasks=specs, **flat)


LLAVA_SITES = ("lm.*.layer", "lm.*.self_attn", "lm.*.mlp", "lm.*.self_attn.head*")


def demo_configs(out: str | Path) -> list[RunConfig]:
    """The main job on both embedded models: easy-VQA colour and shape, SMP and STR pairs, every
    text-encoder module and cross-attention head of BLIP and every language-model module and
    self-attention head of LLaVA, at every position."""
    out = Path(out)
    tasks = [TaskSpec("easyvqa-color", split="test", limit=120), TaskSpec("easyvqa-shape", split="test", limit=160)]
    return [RunConfig(out=out / "blip", tasks=tasks, model="easyvqa-blip", max_per_cell=1),
            RunConfig(out=out / "llava", tasks=tasks, model="easyvqa-llava", max_per_cell=1, sites=LLAVA_SITES)]


def run_pipeline(config: RunConfig, console) -> Path:
    """Run every step of `config`, skipping finished ones; returns the report's index.html."""
    from notice.report.build import make_report

    results = run_steps(config, console)
    return make_report([results], config.out / "report", config.title, min_conditions=config.min_conditions,
                       top_k=config.top_k, seed=config.seed, rules=config.rule)


def run_demo(out: str | Path, console) -> Path:
    """Both embedded models through every step, then one report that compares them."""
    from notice.report.build import make_report

    configs = demo_configs(out)
    results = [run_steps(config, console) for config in configs]
    return make_report(results, Path(out) / "report", "notice demo: easy-VQA on the embedded BLIP and LLaVA",
                       seed=configs[0].seed)


def run_steps(config: RunConfig, console):
    """Pairs, selection and patching for one model; returns what its report needs."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from notice.models import load_model
    from notice.pairs import read_pairs
    from notice.report.build import ModelResults, selection_row
    from notice.select import select_pairs, selection_report_path, write_selection
    from notice.store import load_results
    from notice.tasks import build_pairs

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_as_json(config), indent=2) + "\n")
    adapter = load_model(config.model, device=config.device, dtype=config.dtype)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    selected, selection_reports = [], {}
    with Progress(*columns, console=console) as progress:
        for spec in config.tasks:
            pairs_file = out / "pairs" / f"{spec.task}.parquet"
            if not pairs_file.is_file():
                build_pairs(spec.task, pairs_file, adapter.tokenizer, data=spec.data, split=spec.split,
                            seed=config.seed, corruptions=spec.corruptions, limit=spec.limit, progress=progress)
            kept_file = out / "selected" / f"{spec.task}.parquet"
            if not kept_file.is_file():
                selection = select_pairs(adapter, read_pairs(pairs_file), threshold=config.threshold,
                                         seed=config.seed, balance=config.balance,
                                         max_per_cell=config.max_per_cell, progress=progress)
                write_selection(selection, kept_file)
            selection_reports[spec.task] = selection_row(json.loads(selection_report_path(kept_file).read_text()))
            selected += read_pairs(kept_file)
        console.print(f"{config.model}: selected {len(selected)} pairs ("
                      + ", ".join(f"{task} {s['kept']}" for task, s in selection_reports.items()) + ")")
        results = patch_all(adapter, selected, config, progress)
    return ModelResults(config.model, load_results(results), adapter, selected, selection_reports)


def patch_all(adapter, pairs, config: RunConfig, progress) -> Path:
    """Patch every pair into the results store under the run folder (resumable per pair)."""
    from notice.patching.engine import count_cells, patch_pairs

    folder = config.out / "results"
    sites = list(config.sites)
    bar = progress.add_task("patching: cells", total=sum(count_cells(adapter, pairs, sites)))
    patch_pairs(adapter, pairs, sites, folder, direction=config.direction, max_memory=config.max_memory,
                progress=lambda cells, skipped=False: progress.update(bar, advance=cells), model_name=config.model,
                dtype=config.dtype)
    return folder


def _as_json(config: RunConfig) -> dict:
    from dataclasses import asdict

    data = asdict(config)
    data["out"] = str(config.out)
    return data
