"""The whole job from a config: pairs → selection → patching → analysis → report.

Every step writes its output under the run folder and is skipped when that output exists, so a
killed run resumes where it stopped (patching resumes per pair through the results store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from notice import checks as check
from notice.checks import Check
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
    max_per_cell: int | None = None  # this task's cap on selected pairs per cell (default: the select section's)


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
    method: str = "exact"  # or "atp" / "atp*": cells estimated by attribution patching
    verify_top: int | None = None  # with atp/atp*: each pair's top cells also patched exactly
    executor: str = "local"  # or "ray": pairs spread over `workers` Ray actors (on `address`, or a local cluster)
    workers: int | None = None
    address: str | None = None
    min_conditions: int | None = None
    top_k: int = 10
    rule: tuple[str, ...] = ("default",)  # head-selection rules of the report (notice.analysis.paper_rule)
    extra: dict[str, Any] = field(default_factory=dict)


def _checks() -> tuple[dict[str, Check], dict[str, dict[str, Check]], dict[str, Check]]:
    """What each key of a run config may hold: top-level keys, per-section keys, per-task keys."""
    from notice.patching.metrics import DIRECTIONS
    from notice.tasks import TASKS

    top = {"model": check.text(), "out": check.text(), "title": check.text(), "seed": check.whole(),
           "device": check.device, "dtype": check.dtype, "tasks": _accept, "select": _accept, "patch": _accept,
           "report": _accept}
    sections = {"select": {"threshold": check.number(0), "max_per_cell": check.whole(1, optional=True),
                           "balance": check.flag},
                "patch": {"sites": check.site_patterns, "direction": check.one_of(DIRECTIONS, "direction"),
                          "max_memory": check.memory, "method": check.one_of(("exact", "atp", "atp*"), "method"),
                          "verify_top": check.whole(1, optional=True), "executor": check.one_of(("local", "ray"), "executor"),
                          "workers": check.whole(1, optional=True), "address": check.text(optional=True)},
                "report": {"min_conditions": check.whole(1, optional=True), "top_k": check.whole(1),
                           "rule": check.head_rules}}
    task = {"task": check.one_of(TASKS, "task"), "data": check.text(optional=True), "split": check.text(optional=True),
            "corruptions": check.names(CORRUPTIONS, "corruption"), "limit": check.whole(1, optional=True),
            "max_per_cell": check.whole(1, optional=True)}
    return top, sections, task


def _accept(name: str, value: Any) -> Any:  # checked below, part by part
    return value


def _checked(values: Any, allowed: dict[str, Check], where: str, source: str) -> dict[str, Any]:
    """Every key of a mapping known and its value checked; one line naming the first that is not."""
    if not isinstance(values, dict):
        raise NoticeError(f"{source}: {where or 'the config'} must be a mapping of keys to values, not {values!r}")
    unknown = set(values) - set(allowed)
    if unknown:
        under = f" under {where}" if where else ""
        raise NoticeError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}{under}; "
                          f"valid: {', '.join(sorted(allowed))}")
    prefix = f"{source}: {where}." if where else f"{source}: "
    return {key: allowed[key](prefix + key, value) for key, value in values.items()}


def load_config(path: str | Path, out: str | Path | None = None) -> RunConfig:
    """Read a run config (YAML); unknown keys and bad values are one-line errors naming them. Relative
    paths in it (out, data) are read from the config's folder; `out` given here, from the working one."""
    path = Path(path)
    if not path.is_file():
        raise NoticeError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise NoticeError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
    return config_from_dict(raw, str(path), base=path.parent, out=out)


def config_from_dict(raw: dict, source: str, base: Path = Path("."), out: str | Path | None = None) -> RunConfig:
    """A RunConfig from parsed YAML, every value checked before anything is loaded or written."""
    top_checks, section_checks, task_checks = _checks()
    top = _checked(raw, top_checks, "", source)
    flat: dict[str, Any] = {k: top[k] for k in ("model", "title", "seed", "device", "dtype") if k in top}
    for section, keys in section_checks.items():
        flat.update(_checked(top.get(section) or {}, keys, section, source))
    for key in ("sites", "rule"):
        if key in flat:
            flat[key] = tuple(flat[key])
    tasks = top.get("tasks")
    if not tasks:
        raise NoticeError(f"{source}: list at least one entry under tasks (e.g. - task: easyvqa-color)")
    if not isinstance(tasks, list):
        raise NoticeError(f"{source}: tasks must be a list, e.g. tasks: [{tasks}] or an entry - task: {tasks}")
    specs = []
    for i, entry in enumerate(tasks):
        entry = _checked({"task": entry} if isinstance(entry, str) else entry, task_checks, f"tasks[{i}]", source)
        if "task" not in entry:
            raise NoticeError(f"{source}: tasks[{i}] needs a task name (task: easyvqa-color)")
        data = (base / entry["data"]).resolve() if entry.get("data") else None
        if data is not None:
            check.existing_folder(f"{source}: tasks[{i}].data", data)
        specs.append(TaskSpec(entry["task"], str(data) if data else None, entry.get("split"),
                              tuple(entry.get("corruptions") or TaskSpec.corruptions), entry.get("limit"),
                              entry.get("max_per_cell")))
    if out is None and not top.get("out"):
        raise NoticeError(f"{source}: say where results go with out: FOLDER (or --out)")
    target = Path(out) if out is not None else (base / top["out"]).resolve()
    check.output_folder("--out" if out is not None else f"{source}: out", target)
    return RunConfig(out=target, tasks=specs, **flat)


LLAVA_SITES = ("lm.*.layer", "lm.*.self_attn", "lm.*.mlp", "lm.*.self_attn.head*")
# Llama-3.2-Vision: the self- and cross-attention heads and modules of every LM layer that has them
MLLAMA_SITES = ("lm.*.layer", "lm.*.self_attn", "lm.*.cross_attn", "lm.*.mlp", "lm.*.self_attn.head*",
                "lm.*.cross_attn.head*")


def demo_configs(out: str | Path) -> list[RunConfig]:
    """The main job on the three embedded models: easy-VQA colour and shape, each with Semantic Minimal
    Pairs (image) and yes/no STR (text), plus Gaussian noise on the object as the image baseline of shape
    (noise on a colour seldom flips these models: colour survives it); every text-encoder module and
    cross-attention head of BLIP, every language-model module and self-attention head of LLaVA, and every
    language-model module, self- and cross-attention head of Llama-3.2-Vision, at every position. Each
    condition keeps 48 pairs: 3 per colour and answer order, 8 per shape and answer order."""
    out = Path(out)
    tasks = [TaskSpec("easyvqa-color", split="test", limit=64, max_per_cell=3,
                      corruptions=("image_smp", "text_str_yesno")),
             TaskSpec("easyvqa-shape", split="test", limit=240, max_per_cell=8,
                      corruptions=("image_smp", "text_str_yesno", "image_noise"))]
    return [RunConfig(out=out / "blip", tasks=tasks, model="easyvqa-blip"),
            RunConfig(out=out / "llava", tasks=tasks, model="easyvqa-llava", sites=LLAVA_SITES),
            RunConfig(out=out / "mllama", tasks=tasks, model="easyvqa-mllama", sites=MLLAMA_SITES)]


def run_pipeline(config: RunConfig, console) -> Path:
    """Run every step of `config`, skipping finished ones; returns the report's index.html."""
    from notice.report.build import make_report

    results = run_steps(config, console)
    return make_report([results], config.out / "report", config.title, min_conditions=config.min_conditions,
                       top_k=config.top_k, seed=config.seed, rules=config.rule)


def run_demo(out: str | Path, console, processes: int | None = None) -> Path:
    """Every embedded model through every step, side by side in `processes` processes (default: one per
    model where there are several cores), then one report that compares them."""
    from notice.executors.processes import run_models
    from notice.report.build import make_report

    configs = demo_configs(out)
    results = run_models(configs, console, processes)
    return make_report(results, Path(out) / "report", "notice demo: easy-VQA on the embedded BLIP, LLaVA and Llama-3.2-Vision",
                       seed=configs[0].seed)


def progress_bars(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def run_steps(config: RunConfig, console, progress=None):
    """Pairs, selection and patching for one model; returns what its report needs. Bars go to `progress`
    (default: a display of its own on `console`)."""
    from notice.analysis.head_functions import read_head_functions, write_head_functions
    from notice.io import no_new_empty_folders
    from notice.models import load_model
    from notice.pairs import read_pairs
    from notice.patching.engine import example_run
    from notice.patching.sites import check_patterns
    from notice.report.build import ModelResults
    from notice.select import selection_report_path
    from notice.store import load_results

    out = config.out
    adapter = load_model(config.model, device=config.device, dtype=config.dtype)
    check_patterns(config.sites, adapter.streams, adapter.num_positions(example_run(adapter)))
    with no_new_empty_folders(out), progress or progress_bars(console) as progress:
        selected_files = select_steps(config, adapter, progress)
        selection_reports = {path.stem: json.loads(selection_report_path(path).read_text())
                             for path in selected_files}
        selected = [pair for path in selected_files for pair in read_pairs(path)]
        console.print(f"{config.model}: selected {len(selected)} pairs ("
                      + ", ".join(f"{task} {s['kept']}" for task, s in selection_reports.items()) + ")")
        results = patch_all(adapter, selected, config, progress, selected_files)
    functions = read_head_functions(out / "head_functions")
    if functions is None:
        console.print(f"{config.model}: head functions on {len(selected)} clean inputs")
        functions = read_head_functions(write_head_functions(adapter, selected, out / "head_functions"))
    return ModelResults(config.model, load_results(results), functions, selected, selection_reports)


def select_steps(config: RunConfig, adapter, progress=None) -> list[Path]:
    """Pairs and selection of every task of `config` (each step skipped when its file exists); returns the
    selected pairs files, `<out>/selected/<task>.parquet`, their drop counts beside them."""
    from notice.models import PromptBudget
    from notice.pairs import pairs_provenance, read_pairs
    from notice.select import select_pairs, write_selection
    from notice.tasks import build_pairs

    budget = PromptBudget.of(adapter)
    kept_files = []
    for spec in config.tasks:
        pairs_file = config.out / "pairs" / f"{spec.task}.parquet"
        if not pairs_file.is_file():
            build_pairs(spec.task, pairs_file, adapter.tokenizer, data=spec.data, split=spec.split,
                        seed=config.seed, corruptions=spec.corruptions, limit=spec.limit, progress=progress,
                        budget=budget)
        _record_config(config)  # once a step has finished: from then on the folder is a run folder
        kept_file = config.out / "selected" / f"{spec.task}.parquet"
        if not kept_file.is_file():
            selection = select_pairs(adapter, read_pairs(pairs_file), threshold=config.threshold,
                                     seed=config.seed, balance=config.balance,
                                     max_per_cell=spec.max_per_cell or config.max_per_cell, progress=progress)
            write_selection(selection, kept_file, pairs_provenance(pairs_file))
        kept_files.append(kept_file)
    return kept_files


def _record_config(config: RunConfig) -> None:
    from notice.io import atomic_path

    with atomic_path(config.out / "config.json") as tmp:
        tmp.write_text(json.dumps(_as_json(config), indent=2) + "\n")


def patch_all(adapter, pairs, config: RunConfig, progress, pairs_files: Sequence[Path] = ()) -> Path:
    """Patch every pair into the results store under the run folder (resumable per pair)."""
    from notice.patching.engine import count_cells, patch_pairs
    from notice.store import file_record

    folder = config.out / "results"
    sites = list(config.sites)
    provenance = {"seed": config.seed, "pairs": [file_record(path) for path in pairs_files]}
    bar = progress.add_task("patching: cells", total=sum(count_cells(adapter, pairs, sites)))
    if config.executor == "ray":
        from notice.executors.ray import patch_pairs_on_ray

        summary = patch_pairs_on_ray(config.model, pairs, sites, folder, config.direction, workers=config.workers or 1,
                                     address=config.address, device=config.device, dtype=config.dtype,
                                     max_memory=config.max_memory, provenance=provenance, method=config.method,
                                     verify_top=config.verify_top,
                                     progress=lambda cells, skipped: progress.update(bar, advance=cells))
        if summary["failed"]:
            raise NoticeError(f"{len(summary['failed'])} pair(s) lost their worker on every try "
                              f"({', '.join(summary['failed'])}); rerun the same command to try them again")
        return folder
    patch_pairs(adapter, pairs, sites, folder, direction=config.direction, max_memory=config.max_memory,
                progress=lambda cells, skipped: progress.update(bar, advance=cells), model_name=config.model,
                dtype=config.dtype, provenance=provenance, method=config.method, verify_top=config.verify_top)
    return folder


def _as_json(config: RunConfig) -> dict:
    from dataclasses import asdict

    data = asdict(config)
    data["out"] = str(config.out)
    return data
