"""From results tables (and the pairs and head-function tables beside them) to the HTML report.

Each model's table is analysed once (`analyse`: conditions, module means, ranked and universal
heads); the summary at the top and the sections below are views of that analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from notice.analysis import head_functions as hf
from notice.analysis.conditions import MIN_PAIRS, condition_labels, condition_table
from notice.analysis.heads import head_name, module_means, one_method
from notice.analysis.paper_rule import PAPER_RULES, answer_records, check_rules
from notice.analysis.universal import condition_names, rank_by_condition, universal_heads
from notice.errors import NoticeError
from notice.io import staged_folder
from notice.pairs import Pair
from notice.report import sections
from notice.report.figures import Figures
from notice.report.html import Report, Tables, write_report
from notice.report.rules import rule_section
from notice.report.summary import summary

# The answer decoder's cross-attention (BLIP's `decoder`) reads the text encoder's output, not the image.
NOT_IMAGE_READERS = ("decoder",)


def focus_of(table: pd.DataFrame) -> tuple[str, str]:
    """The (stream, attention component) whose heads a table's analysis centres on: where text meets
    the image. Cross-attention heads where a stream has them (BLIP's text encoder, a Q-Former, a
    language model with cross-attention layers), else the language model's self-attention heads (an
    image-token LM reads the image tokens through them); read from the table alone."""
    kinds = table.loc[table["head"].notna(), ["stream", "component"]].drop_duplicates()
    present = {(str(stream), str(component)) for stream, component in kinds.itertuples(index=False)}
    crossing = sorted(stream for stream, component in present
                      if component == "cross_attn" and stream not in NOT_IMAGE_READERS)
    if crossing:
        return crossing[0], "cross_attn"
    if ("lm", "self_attn") in present:
        return "lm", "self_attn"
    return sorted(present)[0] if present else ("text", "cross_attn")


@dataclass
class ModelResults:
    """One model's part of a report: its results table, the head-function tables and the pairs whose
    images the overlays show, and the selection reports by task (as `notice select` writes them)."""

    name: str
    table: pd.DataFrame
    head_functions: hf.HeadFunctions | None = None
    pairs: Sequence[Pair] = ()
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ModelAnalysis:
    """What the report shows of one model, computed once from its tables."""

    results: ModelResults
    focus: tuple[str, str]  # the stream and attention component whose heads are ranked
    conditions: pd.DataFrame  # notice.analysis.conditions.condition_table
    means: dict[str, pd.DataFrame]  # condition → module means (stream, component, layer, position, ...)
    rankings: dict[str, pd.DataFrame]  # condition → ranked heads
    universal: pd.DataFrame
    min_conditions: int | None
    head_statistic: str = ""  # how a head's effect in one pair is read (sections.head_statistic)
    head_measures: pd.DataFrame | None = None  # per head: the head-function measures over samples
    overlays: list[tuple[str, str]] = field(default_factory=list)  # (file, caption), as the report shows them

    @property
    def name(self) -> str:
        return self.results.name

    def layers(self, stream: str) -> int:
        rows = self.results.table[self.results.table["stream"] == stream]
        return int(rows["layer"].max()) + 1 if len(rows) else 0


def analyse(results: ModelResults, min_conditions: int | None = None, universal_top_k: int = 3, seed: int = 0,
            min_pairs: int = MIN_PAIRS) -> ModelAnalysis:
    table = results.table
    focus = focus_of(table)
    means = {}
    for condition, rows in table.groupby(condition_labels(table), sort=True):
        streams = sorted(set(rows.loc[rows["head"].isna(), "stream"]))
        frames = [module_means(rows, stream, seed=seed).assign(stream=stream) for stream in streams]
        means[str(condition)] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    rankings = rank_by_condition(table, *focus, top_k=universal_top_k, seed=seed)
    measures = None
    if results.head_functions is not None:
        measures = hf.summarize_head_functions(results.head_functions.table)
        measures.insert(0, "head_name", [head_name(l, h) for l, h in zip(measures["layer"], measures["head"])])
    return ModelAnalysis(results, focus, condition_table(table, results.selection, min_pairs), means, rankings,
                         universal_heads(rankings, min_conditions), min_conditions,
                         sections.head_statistic(table, focus), measures)


def make_report(models: Sequence[ModelResults], out_dir: Path, title: str, min_conditions: int | None = None,
                top_k: int = 10, universal_top_k: int = 3, overlays_per_head: int = 2, seed: int = 0,
                rules: Sequence[str] = ("default",), min_pairs: int = MIN_PAIRS) -> Path:
    """Write the report of one or several models to `out_dir`: a summary of what was done and found,
    then per model and task the conditions side by side (noise-free corruptions beside their
    Gaussian-noise baselines), universal heads, head functions; with several models, a comparison.
    `top_k` heads are listed per condition; the `universal_top_k` strongest of each condition count
    for the top-k variant of universality; conditions with fewer than `min_pairs` pairs are flagged.
    `rules` beyond "default" add the NOTICE paper's head selection (notice.analysis.paper_rule).
    Everything is written beside `out_dir` first and moved in at the end: an error leaves it as it was."""
    rules = check_rules(rules)
    models = [replace(model, table=one_method(model.table)) for model in models]
    for model in models:
        count = len(condition_names(model.table, *focus_of(model.table))) if min_conditions is not None else 0
        if min_conditions is not None and not 1 <= min_conditions <= max(count, 1):
            raise NoticeError(f"min_conditions {min_conditions} is not within the {count} condition(s) with heads in "
                              f"the results of {model.name}: use 1..{max(count, 1)}, or leave it out for all")
        if set(rules) & set(PAPER_RULES) and not model.pairs:
            raise NoticeError(f"--rule {', '.join(r for r in rules if r in PAPER_RULES)} reads where each answer "
                              f"word sits from the pairs: pass --pairs with the pairs files {model.name}'s results "
                              "were patched from")
    analyses = [analyse(model, min_conditions, universal_top_k, seed, min_pairs) for model in models]
    with staged_folder(out_dir) as stage:
        _write_report(analyses, stage, title, top_k, overlays_per_head, rules, min_pairs)
    return Path(out_dir) / "index.html"


def _write_report(analyses: Sequence[ModelAnalysis], out_dir: Path, title: str, top_k: int, overlays_per_head: int,
                  rules: list[str], min_pairs: int) -> Path:
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    tables = Tables(out_dir / "tables")
    with Figures(out_dir) as figures:  # drawn by workers while the sections are built
        report = _sections(analyses, title, top_k, overlays_per_head, rules, figures, tables)
        report.summary, report.facts = summary(analyses, tables, min_pairs)
        report.figures = figures.shown
        bodies = figures.finish([section.body for section in report.sections])
    for section, body in zip(report.sections, bodies):
        section.body = body
    return write_report(report, tables, out_dir)


def _sections(analyses: Sequence[ModelAnalysis], title: str, top_k: int, overlays_per_head: int, rules: list[str],
              figures: Figures, tables: Tables) -> Report:
    report = Report(title, "", {})
    several = len(analyses) > 1
    for analysis in analyses:
        prefix = f"{analysis.name}: " if several else ""
        for task in sorted(set(analysis.conditions["task"])):
            report.sections.append(sections.task_section(analysis, task, tables, figures, top_k, prefix))
        report.sections.append(sections.universal_section(analysis, tables, prefix))
        if rules != ["default"]:
            report.sections.append(rule_section(analysis.results.table, answer_records(analysis.results.pairs),
                                                analysis.focus, rules, analysis.rankings, tables,
                                                analysis.min_conditions, prefix,
                                                sections.slug(prefix) + "-" if prefix else ""))
        if analysis.results.head_functions is not None:
            report.sections.append(sections.head_function_section(analysis, tables, figures, overlays_per_head,
                                                                  prefix))
    if several:
        report.sections.append(sections.comparison_section(analyses, tables, figures, top_k=5))
    report.sections.append(sections.selection_section(analyses, tables))
    return report


def _selection_reports(pairs_files: dict[Path, list[Pair]]) -> dict[str, dict[str, Any]]:
    """task → the selection report beside a selected pairs file (`<stem>.selection.json`), where there is
    one and the file holds one task (its counts are by corruption only)."""
    import json

    from notice.select import selection_report_path

    reports = {}
    for path, pairs in pairs_files.items():
        report, tasks = selection_report_path(path), {pair.task for pair in pairs}
        if report.is_file() and len(tasks) == 1:
            reports[tasks.pop()] = json.loads(report.read_text())
    return reports


def report_from_folder(results: Path, out: Path, pairs_files: Sequence[Path] = (), head_functions: Path | None = None,
                       title: str = "notice report", min_conditions: int | None = None, top_k: int = 10,
                       rules: Sequence[str] = ("default",)) -> Path:
    """The report of a run folder (`notice run`/`demo`) or of a `notice patch` output folder; head
    functions from a `notice head-functions` folder (a run folder has its own); selection counts from
    beside the pairs files."""
    import json

    from notice.pairs import read_pairs
    from notice.store import load_results

    rules = check_rules(rules)  # before anything slow
    results = Path(results)
    run_config = results / "config.json"
    name = None
    functions = None
    if run_config.is_file() and (results / "results").is_dir():  # a pipeline run folder
        name = json.loads(run_config.read_text())["model"]
        pairs_files = list(pairs_files) or sorted((results / "selected").glob("*.parquet"))
        functions = hf.read_head_functions(results / "head_functions")
        results = results / "results"
    if head_functions is not None:
        functions = hf.read_head_functions(head_functions)
        if functions is None:
            raise NoticeError(f"{head_functions} holds no head-function tables: write them with "
                              "`notice head-functions PAIRS --out FOLDER`")
    table = load_results(results)
    if name is None and "model" in table and table["model"].nunique() == 1:
        name = str(table["model"].iloc[0])
    pairs_by_file = {Path(f): read_pairs(f) for f in pairs_files}
    pairs = [p for file_pairs in pairs_by_file.values() for p in file_pairs]
    return make_report([ModelResults(name or "unknown", table, functions, pairs, _selection_reports(pairs_by_file))],
                       out, title, min_conditions=min_conditions, top_k=top_k, rules=rules)
