"""From a results table (and optionally the model and its pairs) to the HTML report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from notice.analysis import head_functions as hf
from notice.analysis.heads import head_effects, head_heatmap, head_name, module_heatmap
from notice.analysis.paper_rule import PAPER_RULES, answer_records, check_rules
from notice.analysis.universal import condition_labels, condition_names, rank_by_condition, universal_heads
from notice.errors import NoticeError
from notice.io import load_image, staged_folder
from notice.pairs import Pair
from notice.report.figures import attention_overlay, heatmap, interactive_heatmap
from notice.report.html import Report, Section, figure_html, table_html, write_report
from notice.report.rules import rule_section

COMPONENT_TITLES = {"layer": "layer output", "self_attn": "self-attention", "cross_attn": "cross-attention",
                    "mlp": "MLP"}


def position_labels(table: pd.DataFrame, positions: Sequence[int]) -> list[str]:
    """Label each position by its token; where samples differ (the options), show the variants."""
    labels = []
    for position in positions:
        tokens = table.loc[table["position"] == position, "token"].dropna().astype(str)
        variants = list(dict.fromkeys(tokens))
        if len(variants) == 1:
            labels.append(variants[0])
        elif variants:
            labels.append(f"{position}:{'/'.join(variants[:2])}{'…' if len(variants) > 2 else ''}")
        else:
            labels.append(str(position))
    return labels


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def condition_section(condition: str, rows: pd.DataFrame, ranked: pd.DataFrame | None, out_dir: Path,
                      focus: tuple[str, str], top_k: int, prefix: str = "") -> Section:
    stream, head_component = focus
    parts = []
    figures = []
    for component in [c for c in COMPONENT_TITLES if c in set(rows.loc[rows["stream"] == stream, "component"])]:
        views = module_heatmap(rows, stream, component)
        if views["mean"].empty:
            continue
        labels = position_labels(rows, list(views["mean"].columns))
        title = f"{prefix}{condition}: {stream} {COMPONENT_TITLES[component]}"
        stem = out_dir / "figures" / f"{_slug(prefix + condition)}-{stream}-{component}"
        heatmap(views["mean"], title, "token", labels, stem)
        figures.append(figure_html(f"figures/{stem.name}.png", title + " (PNG; PDF beside it)"))
        parts.append(interactive_heatmap(views, title, "token", labels, f"{_slug(prefix + condition)}-{component}"))
    effects = head_effects(rows, stream, head_component)
    if not effects.empty:
        views = head_heatmap(effects)
        title = f"{prefix}{condition}: {stream} {COMPONENT_TITLES[head_component]} heads"
        stem = out_dir / "figures" / f"{_slug(prefix + condition)}-{stream}-heads"
        heads = [str(h) for h in views["mean"].columns]
        heatmap(views["mean"], title, "head", heads, stem)
        figures.append(figure_html(f"figures/{stem.name}.png", title + " (PNG; PDF beside it)"))
        parts.append(interactive_heatmap(views, title, "head", heads, f"{_slug(prefix + condition)}-heads"))
    body = f'<div class="figures">{"".join(figures)}</div>' + "".join(parts)
    if ranked is not None:
        shown = ranked.head(top_k).assign(head=lambda f: [head_name(l, h) for l, h in zip(f["layer"], f["head"])])
        shown = shown[["rank", "head", "mean_abs_effect", "ci_low", "ci_high", "mean_effect", "samples", "important"]]
        body += (f'<p class="note">Rule default: heads ranked by mean |normalized effect| over samples, 95% bootstrap '
                 f"interval; important: above mean + 2σ over heads ({ranked.attrs['threshold']:.3f}).</p>"
                 + table_html(shown))
    return Section(prefix + condition, body)


# Where each family's heads meet the image: BLIP's text encoder cross-attends it, LLaVA's
# language model self-attends the image tokens.
HEAD_FOCUS = (("text", "cross_attn"), ("lm", "self_attn"))


def focus_of(table: pd.DataFrame) -> tuple[str, str]:
    """The (stream, attention component) whose heads a table's analysis centres on."""
    heads = table[table["head"].notna()]
    present = set(zip(heads["stream"], heads["component"]))
    for focus in HEAD_FOCUS:
        if focus in present:
            return focus
    return sorted(present)[0] if present else HEAD_FOCUS[0]


@dataclass
class ModelResults:
    """One model's part of a report: its results table, the head-function tables and the pairs whose
    images the overlays show, and the selection counts."""

    name: str
    table: pd.DataFrame
    head_functions: hf.HeadFunctions | None = None
    pairs: Sequence[Pair] = ()
    selection: dict[str, dict] = field(default_factory=dict)


def make_report(models: Sequence[ModelResults], out_dir: Path, title: str, min_conditions: int | None = None,
                top_k: int = 10, universal_top_k: int = 3, overlays_per_head: int = 2, seed: int = 0,
                rules: Sequence[str] = ("default",)) -> Path:
    """Write the report of one or several models to `out_dir`; with several, a comparison of
    their heads follows their own sections. `top_k` heads are listed per condition; the
    `universal_top_k` strongest of each condition count for the top-k variant of universality.
    `rules` beyond "default" add the NOTICE paper's head selection (notice.analysis.paper_rule).
    Everything is written beside `out_dir` first and moved in at the end: an error leaves it as it was."""
    rules = check_rules(rules)
    for model in models:
        count = len(condition_names(model.table, *focus_of(model.table)))
        if min_conditions is not None and not 1 <= min_conditions <= max(count, 1):
            raise NoticeError(f"min_conditions {min_conditions} is not within the {count} condition(s) with heads in "
                              f"the results of {model.name}: use 1..{max(count, 1)}, or leave it out for all")
        if set(rules) & set(PAPER_RULES) and not model.pairs:
            raise NoticeError(f"--rule {', '.join(r for r in rules if r in PAPER_RULES)} reads where each answer "
                              f"word sits from the pairs: pass --pairs with the pairs files {model.name}'s results "
                              "were patched from")
    with staged_folder(out_dir) as stage:
        _write_report(models, stage, title, min_conditions, top_k, universal_top_k, overlays_per_head, seed, rules)
    return Path(out_dir) / "index.html"


def _write_report(models: Sequence[ModelResults], out_dir: Path, title: str, min_conditions: int | None,
                  top_k: int, universal_top_k: int, overlays_per_head: int, seed: int, rules: list[str]) -> Path:
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    sections, universals = [], {}
    for model in models:
        prefix = f"{model.name}: " if len(models) > 1 else ""
        focus = focus_of(model.table)
        rankings = rank_by_condition(model.table, *focus, top_k=universal_top_k, seed=seed)
        sections.append(overview_section(model.table, model.selection, prefix))
        for condition, rows in model.table.groupby(condition_labels(model.table), sort=True):
            sections.append(condition_section(condition, rows, rankings.get(condition), out_dir, focus, top_k,
                                              prefix))
        universal = universal_heads(rankings, min_conditions) if rankings else pd.DataFrame()
        universals[model.name] = (focus, rankings, universal)
        k = len(rankings) if min_conditions is None else min_conditions
        sections.append(Section(f"{prefix}Universal heads", (
            f'<p class="note">Rule default: {COMPONENT_TITLES[focus[1]]} heads of the {focus[0]} stream important '
            f"(mean + 2σ) in at least {k} of {len(rankings)} conditions, computed from the results table.</p>"
            + (table_html(universal) if not universal.empty else "<p>No head is important in that many conditions.</p>")
            + _top_k_universal(rankings, min_conditions, universal_top_k))))
        if rules != ["default"]:
            sections.append(rule_section(model.table, answer_records(model.pairs), focus, rules, rankings, out_dir,
                                         min_conditions, prefix, _slug(prefix) + "-" if prefix else ""))
        if model.head_functions is not None:
            heads = _focus_heads(universal, rankings)
            sections.append(head_function_section(model.head_functions, model.pairs, heads, out_dir,
                                                  overlays_per_head, prefix))
    if len(models) > 1:
        sections.append(comparison_section(universals, top_k=5))
    summary = {"models": ", ".join(m.name for m in models),
               "rows in the results tables": f"{sum(len(m.table) for m in models):,}",
               "samples": ", ".join(f"{m.name} {m.table['pair_id'].nunique()}" for m in models)}
    return write_report(Report(title, summary, sections), out_dir)


def comparison_section(universals: dict[str, tuple], top_k: int) -> Section:
    """Each model's strongest heads per condition side by side, and how many are universal."""
    rows = []
    for name, (focus, rankings, _) in universals.items():
        for condition, ranked in rankings.items():
            top = ranked.head(top_k)
            rows.append({"model": name, "heads": f"{focus[0]} {COMPONENT_TITLES[focus[1]]}", "condition": condition,
                         "important": int(ranked["important"].sum()), "of": len(ranked),
                         f"top {top_k} (mean |effect|)": ", ".join(
                             f"{head_name(r.layer, r.head)} ({r.mean_abs_effect:.2f})" for r in top.itertuples())})
    counts = pd.DataFrame([{"model": name, "universal heads": len(universal),
                            "which": ", ".join(universal["head"]) if len(universal) else "–"}
                           for name, (_, _, universal) in universals.items()])
    body = ('<p class="note">Where image and text meet: BLIP\'s text-encoder cross-attention heads against '
            "LLaVA's language-model self-attention heads, by condition.</p>" + table_html(pd.DataFrame(rows))
            + table_html(counts))
    return Section("Families compared", body)


def overview_section(table: pd.DataFrame, selection: dict[str, dict], prefix: str = "") -> Section:
    counts = (table.groupby(["task", "modality", "corruption", "direction"])["pair_id"].nunique()
              .rename("samples").reset_index())
    body = "<p>Samples patched per condition:</p>" + table_html(counts)
    if selection:
        rows = [{"pairs file": name, **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}}
                for name, summary in selection.items()]
        body += "<p>Selection (pairs kept and dropped by each filter):</p>" + table_html(pd.DataFrame(rows))
    return Section(f"{prefix}Tasks and selection", body)


def _top_k_universal(rankings: dict[str, pd.DataFrame], min_conditions: int | None, k: int) -> str:
    """Two views beside the 2σ rule: each condition's k strongest heads, and every head
    important anywhere with the number of conditions that name it."""
    if not rankings:
        return ""
    strongest = universal_heads(rankings, min_conditions, rule="top_k")
    anywhere = universal_heads(rankings, 1)
    return (f"<p class=\"note\">With each condition's {k} strongest heads instead of the 2σ rule:</p>"
            + (table_html(strongest) if not strongest.empty else "<p>None.</p>")
            + "<p class=\"note\">Every head important (2σ) in at least one condition:</p>"
            + (table_html(anywhere) if not anywhere.empty else "<p>None.</p>"))


def _focus_heads(universal: pd.DataFrame, rankings: dict[str, pd.DataFrame]) -> list[tuple[int, int]]:
    """Universal heads if any, else the important (or strongest) heads of every condition."""
    if not universal.empty:
        return [(int(r.layer), int(r.head_index)) for r in universal.itertuples()]
    heads: dict[tuple[int, int], None] = {}
    for ranked in rankings.values():
        chosen = ranked[ranked["important"]] if ranked["important"].any() else ranked.head(1)
        for row in chosen.itertuples():
            heads[(int(row.layer), int(row.head))] = None
    return list(heads)[:8]


def head_function_section(functions: hf.HeadFunctions, pairs: Sequence[Pair], focus: list[tuple[int, int]],
                          out_dir: Path, overlays_per_head: int, prefix: str = "") -> Section:
    measures = hf.summarize_head_functions(functions.table)
    measures.insert(0, "head_name", [head_name(l, h) for l, h in zip(measures["layer"], measures["head"])])
    focused = measures.set_index(["layer", "head"]).loc[[h for h in focus if h in set(
        zip(measures["layer"], measures["head"]))]].reset_index() if focus else measures.head(0)
    facts = functions.facts
    body = (f'<p class="note">Attention of the {facts["stream"]} stream\'s {COMPONENT_TITLES[facts["component"]]} '
            "heads from the query token (BLIP: the answer word in the question; an image-token LM: the last prompt "
            "token, where the answer is read out) to the image patches, averaged over "
            f"{facts['samples']} selected clean inputs. mask_mass: attention inside the object mask; mask_iou: IoU of "
            "the top-attended patches with the mask (implicit segmentation); object_inhibition: mass on the object "
            "minus the average head's (negative: looks away); outlier_inhibition: mass on high-norm outlier "
            "patches minus the average head's.</p>")
    body += "<h3>Heads in focus</h3>" + (table_html(focused) if not focused.empty else "<p>None.</p>")
    strongest = measures.dropna(subset=["mask_iou"]).sort_values("mask_iou", ascending=False).head(5)
    if not strongest.empty:
        body += "<h3>Best implicit segmenters (highest mask IoU)</h3>" + table_html(strongest)
    images = {p.id: p.clean_image for p in pairs}
    shown = [pair_id for pair_id in dict.fromkeys(functions.maps["pair_id"]) if pair_id in images][:overlays_per_head]
    figures = []
    for layer, head in focus:
        for pair_id in shown:
            target = out_dir / "figures" / f"overlay-{_slug(prefix + pair_id)}-L{layer}H{head}.png"
            attention_overlay(load_image(images[pair_id]), hf.relative_map(functions.maps, pair_id, layer, head),
                              f"{head_name(layer, head)} minus average head", target)
            figures.append(figure_html(f"figures/{target.name}", f"{pair_id}: {head_name(layer, head)}"))
    if figures:
        body += "<h3>Attention overlays</h3><div class=\"figures\">" + "".join(figures) + "</div>"
    return Section(f"{prefix}What the heads do", body)


def report_from_folder(results: Path, out: Path, pairs_files: Sequence[Path] = (), head_functions: Path | None = None,
                       title: str = "notice report", min_conditions: int | None = None, top_k: int = 10,
                       rules: Sequence[str] = ("default",)) -> Path:
    """The report of a run folder (`notice run`/`demo`) or of a `notice patch` output folder; head
    functions from a `notice head-functions` folder (a run folder has its own)."""
    import json

    from notice.pairs import read_pairs
    from notice.select import selection_row
    from notice.store import load_results

    rules = check_rules(rules)  # before anything slow
    results = Path(results)
    run_config = results / "config.json"
    selection: dict[str, dict] = {}
    name = None
    if run_config.is_file() and (results / "results").is_dir():  # a pipeline run folder
        name = json.loads(run_config.read_text())["model"]
        pairs_files = list(pairs_files) or sorted((results / "selected").glob("*.parquet"))
        for path in sorted((results / "selected").glob("*.selection.json")):
            selection[path.name.split(".")[0]] = selection_row(json.loads(path.read_text()))
        functions = hf.read_head_functions(results / "head_functions")
        results = results / "results"
    else:
        functions = None
    if head_functions is not None:
        functions = hf.read_head_functions(head_functions)
        if functions is None:
            raise NoticeError(f"{head_functions} holds no head-function tables: write them with "
                              "`notice head-functions PAIRS --out FOLDER`")
    table = load_results(results)
    if "method" in table and table["method"].nunique() > 1:  # estimates with some cells verified: one view
        table = table[table["method"] != "exact"]
    if name is None and "model" in table and table["model"].nunique() == 1:
        name = str(table["model"].iloc[0])
    pairs = [p for f in pairs_files for p in read_pairs(f)]
    return make_report([ModelResults(name or "unknown", table, functions, pairs, selection)], out, title,
                       min_conditions=min_conditions, top_k=top_k, rules=rules)
