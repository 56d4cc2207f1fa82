"""The report's sections, one model at a time: per task its conditions side by side (noise-free
corruptions beside their Gaussian-noise baselines), universal heads, what the heads do; then the
families compared and the selection counts. Each reads a `ModelAnalysis`, never a model."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from notice.analysis import head_functions as hf
from notice.analysis.conditions import condition_label, condition_title
from notice.analysis.heads import head_name
from notice.analysis.universal import universal_heads
from notice.io import load_image
from notice.pairs import Pair
from notice.report.figures import Grid, Panel, attention_overlay, interactive_grid, static_grid
from notice.report.html import Figure, Section, Tables, table_html

if TYPE_CHECKING:
    from notice.report.build import ModelAnalysis

COMPONENT_TITLES = {"layer": "layer output", "self_attn": "self-attention", "cross_attn": "cross-attention",
                    "mlp": "MLP"}
DIRECTIONS = {"denoise": "clean activations patched into the corrupted run",
              "noise": "corrupted activations patched into the clean run"}
METRIC_TEXT = ("normalized effect (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt), where LD is the logit of the "
               "correct answer minus the incorrect one's at the first answer step: 1 is the clean run's answer, 0 the "
               "corrupted run's")


def slug(text: str) -> str:
    """A file and element name: "easyvqa-blip: easyvqa-color" → "easyvqa-blip-easyvqa-color"."""
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")


def component_title(stream: str, component: str) -> str:
    return f"{stream} {COMPONENT_TITLES.get(component, component)}"


def directions_text(directions: Sequence[str]) -> str:
    return "; ".join(f"{d}: {DIRECTIONS.get(d, d)}" for d in directions)


# ------------------------------------------------------------------------------ tasks
def task_section(analysis: ModelAnalysis, task: str, tables: Tables, figures: list[Figure], out_dir: Path,
                 top_k: int, prefix: str = "") -> Section:
    """A task's conditions by corrupted modality: which exist and why some are empty, one module figure
    and one head figure with the conditions as columns, and each condition's ranked heads."""
    body = ""
    for modality, group in analysis.conditions[analysis.conditions["task"] == task].groupby("modality", sort=True):
        body += f"<h3>{html.escape(str(modality))} corrupted</h3>" + _condition_list(group)
        shown = group[group["analysed"] > 0]
        if shown.empty:
            continue
        stem = slug(f"{prefix}{task}-{modality}")
        body += _module_figure(analysis, shown, stem, tables, figures, out_dir)
        body += _head_figure(analysis, shown, stem, figures, out_dir)
        body += _rankings(analysis, shown, tables, top_k)
    return Section(f"{prefix}{task}", body)


def _condition_list(group: pd.DataFrame) -> str:
    items = []
    for row in group.itertuples():
        what = f"{row.analysed} pairs" if row.status == "ok" else f"{row.analysed} pairs, {row.status}: {row.reason}"
        warn = "" if row.status == "ok" else ' class="status-warn"'
        items.append(f'<li data-condition="{html.escape(row.condition)}"{warn}><b>{html.escape(row.condition)}</b> · '
                     f"{html.escape(condition_title(row.corruption))}: {html.escape(what)}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _panel_title(row) -> str:
    return f"{condition_title(row.corruption)} ({row.condition}, n={row.analysed})"


def _module_figure(analysis: ModelAnalysis, shown: pd.DataFrame, stem: str, tables: Tables, figures: list[Figure],
                   out_dir: Path) -> str:
    """Rows: the modules patched (layer output, attention, MLP); columns: the conditions."""
    means = {row.condition: analysis.means.get(row.condition, pd.DataFrame()) for row in shown.itertuples()}
    for row in shown.itertuples():
        frame = means[row.condition]
        if not frame.empty:
            tables.add("module_means", frame.assign(model=analysis.name, condition=row.condition, task=row.task,
                                                    modality=row.modality, corruption=row.corruption,
                                                    direction=row.direction),
                       "per model, condition and module (stream, component, layer, token): the mean normalized effect "
                       "over pairs with its 95% bootstrap interval, spread and pair count")
    present = [m[["stream", "component"]] for m in means.values() if not m.empty]
    if not present:
        return ""
    order = {c: i for i, c in enumerate(COMPONENT_TITLES)}
    kinds = sorted({(str(s), str(c)) for frame in present for s, c in zip(frame["stream"], frame["component"])},
                   key=lambda k: (k[0], order.get(k[1], 99), k[1]))
    rows = [[_module_panel(means[row.condition], stream, component, _panel_title(row))
             for row in shown.itertuples()] for stream, component in kinds]
    grid = Grid(f"{analysis.name}: {shown['task'].iloc[0]}, {shown['modality'].iloc[0]} corrupted: modules",
                rows, [component_title(*k) for k in kinds], "", "normalized effect")
    bounds = [grid.bound(r) for r in range(len(kinds))]
    largest = max(bounds)
    scales = "; ".join(f"{component_title(*k)} ±{b:.3g}" + (f" (1/{largest / b:,.0f} of the largest)"
                                                             if b * 100 < largest else "")
                       for k, b in zip(kinds, bounds))
    caption = (f"Each cell: the mean over the condition's pairs of the {METRIC_TEXT}, after patching that module's "
               f"output at that token ({directions_text(sorted(set(shown['direction'])))}). Columns are conditions; "
               f"each row has one colour scale shared by its columns: {scales}. Hover a cell for its 95% bootstrap "
               "interval and pair count.")
    return _figure(grid, f"{stem}-modules", caption, figures, out_dir) + tables.link("module_means")


def _module_panel(means: pd.DataFrame, stream: str, component: str, title: str) -> Panel | None:
    cells = means[(means["stream"] == stream) & (means["component"] == component)] if not means.empty else means
    if cells.empty:
        return None
    pivot = {name: cells.pivot_table(index="layer", columns="position", values=name, aggfunc="first").sort_index()
             for name in ("mean", "ci_low", "ci_high", "count")}
    labels = cells.drop_duplicates("position").set_index("position")["token"]
    return Panel(pivot["mean"], [str(labels[p]) for p in pivot["mean"].columns], title,
                 {"95% CI low": pivot["ci_low"], "95% CI high": pivot["ci_high"], "pairs": pivot["count"]})


def _head_figure(analysis: ModelAnalysis, shown: pd.DataFrame, stem: str, figures: list[Figure],
                 out_dir: Path) -> str:
    """One panel per condition: each head's mean |effect|, the statistic the rankings sort by."""
    panels: list[Panel | None] = []
    for row in shown.itertuples():
        ranked = analysis.rankings.get(row.condition)
        if ranked is None or ranked.empty:
            panels.append(None)
            continue
        pivot = {name: ranked.pivot_table(index="layer", columns="head", values=name, aggfunc="first").sort_index()
                 for name in ("mean_abs_effect", "mean_effect", "ci_low", "ci_high", "samples")}
        panels.append(Panel(pivot["mean_abs_effect"], [str(h) for h in pivot["mean_abs_effect"].columns],
                            _panel_title(row), {"signed mean": pivot["mean_effect"], "95% CI low": pivot["ci_low"],
                                                "95% CI high": pivot["ci_high"], "pairs": pivot["samples"]}))
    if not any(panels):
        return ""
    stream, component = analysis.focus
    grid = Grid(f"{analysis.name}: {shown['task'].iloc[0]}, {shown['modality'].iloc[0]} corrupted: "
                f"{component_title(stream, component)} heads", [panels], ["heads"], "head",
                "mean |normalized effect|", diverging=False)
    table = analysis.results.table
    heads = table[(table["stream"] == stream) & (table["component"] == component) & table["head"].notna()]
    where = ("patched at every position at once" if heads["position"].isna().any()
             else "at the token where it is largest for that pair")
    caption = (f"Each cell: one {component_title(stream, component)} head's mean over the condition's pairs of "
               f"|normalized effect| {where}: the statistic the rankings below sort by (the signed mean is on hover). "
               f"One colour scale for all panels, 0 to {grid.bound(0):.3g}.")
    return _figure(grid, f"{stem}-heads", caption, figures, out_dir)


def _figure(grid: Grid, element_id: str, caption: str, figures: list[Figure], out_dir: Path) -> str:
    files = static_grid(grid, out_dir / "figures" / element_id)
    figure = Figure(element_id, grid.title, caption, interactive_grid(grid, element_id),
                    [f"figures/{path.name}" for path in files])
    figures.append(figure)
    return figure.html()


def _rankings(analysis: ModelAnalysis, shown: pd.DataFrame, tables: Tables, top_k: int) -> str:
    """Each condition's strongest heads with intervals, side by side."""
    blocks = []
    for row in shown.itertuples():
        ranked = analysis.rankings.get(row.condition)
        if ranked is None or ranked.empty:
            continue
        named = ranked.assign(head_name=[head_name(l, h) for l, h in zip(ranked["layer"], ranked["head"])])
        tables.add("head_ranking", named.assign(model=analysis.name, condition=row.condition,
                                                threshold=ranked.attrs["threshold"]),
                   "per model and condition: every head ranked by mean |normalized effect| at its strongest token, "
                   "with its 95% bootstrap interval, signed mean, pair count and the mean + 2σ rule")
        top = named.head(top_k)
        shown_rows = pd.DataFrame({"rank": top["rank"], "head": top["head_name"],
                                   "mean |effect|": top["mean_abs_effect"],
                                   "95% CI": [f"{lo:.3f}–{hi:.3f}" for lo, hi in zip(top["ci_low"], top["ci_high"])],
                                   "signed mean": top["mean_effect"], "pairs": top["samples"],
                                   "important": top["important"]})
        blocks.append(f"<div><p class=\"note\"><b>{html.escape(row.condition)}</b>: heads by mean |normalized effect| "
                      f"(the heatmap's statistic); important above mean + 2σ over heads "
                      f"({ranked.attrs['threshold']:.3f}).</p>{table_html(shown_rows)}</div>")
    if not blocks:
        return ""
    return f'<div class="side">{"".join(blocks)}</div>' + tables.link("head_ranking")


# -------------------------------------------------------------------------- universal heads
def universal_section(analysis: ModelAnalysis, tables: Tables, prefix: str = "") -> Section:
    rankings, min_conditions = analysis.rankings, analysis.min_conditions
    stream, component = analysis.focus
    k = len(rankings) if min_conditions is None else min_conditions
    views = [(f"2σ in ≥ {k} of {len(rankings)} conditions", analysis.universal)]
    if rankings:
        views += [(f"top {_top_k(rankings)} in ≥ {k} of {len(rankings)} conditions",
                   universal_heads(rankings, min_conditions, rule="top_k")),
                  (f"2σ in ≥ 1 of {len(rankings)} conditions", universal_heads(rankings, 1))]
    for by, frame in views:
        tables.add("universal_heads", frame.assign(model=analysis.name, by=by),
                   "per model: heads important (mean + 2σ, or among each condition's strongest) in at least k "
                   "conditions, with the conditions that name them")
    body = (f'<p class="note">Rule default: {component_title(stream, component)} heads important (mean |effect| above '
            f"mean + 2σ over heads) in at least {k} of the {len(rankings)} conditions with head effects, computed from "
            "the results table.</p>"
            + (table_html(analysis.universal) if not analysis.universal.empty
               else "<p>No head is important in that many conditions.</p>"))
    if rankings:
        body += (f"<p class=\"note\">With each condition's {_top_k(rankings)} strongest heads instead of the 2σ "
                 "rule:</p>" + _or_none(views[1][1])
                 + '<p class="note">Every head important (2σ) in at least one condition:</p>' + _or_none(views[2][1]))
    return Section(f"{prefix}Universal heads", body + tables.link("universal_heads"))


def _top_k(rankings: dict[str, pd.DataFrame]) -> int:
    return int(next(iter(rankings.values()))["top_k"].sum())


def _or_none(frame: pd.DataFrame) -> str:
    return table_html(frame) if not frame.empty else "<p>None.</p>"


def focus_heads(analysis: ModelAnalysis) -> list[tuple[int, int]]:
    """Universal heads if any, else the important (or strongest) heads of every condition."""
    if not analysis.universal.empty:
        return [(int(r.layer), int(r.head_index)) for r in analysis.universal.itertuples()]
    heads: dict[tuple[int, int], None] = {}
    for ranked in analysis.rankings.values():
        chosen = ranked[ranked["important"]] if ranked["important"].any() else ranked.head(1)
        for row in chosen.itertuples():
            heads[(int(row.layer), int(row.head))] = None
    return list(heads)[:8]


# ---------------------------------------------------------------------------- head functions
def head_function_section(analysis: ModelAnalysis, tables: Tables, out_dir: Path, overlays_per_head: int,
                          prefix: str = "") -> Section:
    functions = analysis.results.head_functions
    assert functions is not None
    focus = focus_heads(analysis)
    measures = hf.summarize_head_functions(functions.table)
    measures.insert(0, "head_name", [head_name(l, h) for l, h in zip(measures["layer"], measures["head"])])
    measured = set(zip(measures["layer"], measures["head"]))
    focused = measures.set_index(["layer", "head"]).loc[[h for h in focus if h in measured]].reset_index()
    facts = functions.facts
    body = (f'<p class="note">Attention of the {component_title(facts["stream"], facts["component"])} heads from the '
            "query token (BLIP: the answer word in the question; an image-token LM: the last prompt token, where the "
            "answer is read out) to the image patches of the clean image, averaged over "
            f"{facts['samples']} selected clean inputs. mask_mass: attention inside the object mask; mask_iou: IoU of "
            "the top-attended patches with the mask (implicit segmentation); object_inhibition: mass on the object "
            "minus the average head's (negative: looks away); outlier_inhibition: mass on high-norm outlier "
            "patches minus the average head's.</p>")
    body += ("<h3>Heads in focus (universal, else each condition's important heads)</h3>"
             + (table_html(focused) if not focused.empty else "<p>None.</p>")
             + tables.add("head_functions", measures.assign(model=analysis.name),
                          "per model and head: the head-function measures averaged over the selected clean inputs"))
    strongest = measures.dropna(subset=["mask_iou"]).sort_values("mask_iou", ascending=False).head(5)
    if not strongest.empty:
        body += "<h3>Best implicit segmenters (highest mask IoU)</h3>" + table_html(strongest)
    body += _overlays(analysis, functions, focus, out_dir, overlays_per_head, prefix)
    return Section(f"{prefix}What the heads do", body)


def _varied(pairs: Sequence[Pair], count: int) -> list[str]:
    """`count` pair ids taken in turn from each condition (task, corruption), so the overlays show several."""
    by_condition: dict[tuple[str, str], list[str]] = {}
    for pair in pairs:
        by_condition.setdefault((pair.task, pair.corruption), []).append(pair.id)
    in_turn = [ids[i] for i in range(max(map(len, by_condition.values()), default=0))
               for ids in by_condition.values() if i < len(ids)]
    return in_turn[:count]


def _overlays(analysis: ModelAnalysis, functions: hf.HeadFunctions, focus: list[tuple[int, int]], out_dir: Path,
              per_head: int, prefix: str) -> str:
    pairs = {p.id: p for p in analysis.results.pairs}
    shown = _varied([pairs[i] for i in dict.fromkeys(functions.maps["pair_id"]) if i in pairs], per_head)
    figures = []
    for layer, head in focus:
        for pair_id in shown:
            pair, name = pairs[pair_id], head_name(layer, head)
            target = out_dir / "figures" / f"overlay-{slug(prefix + pair_id)}-L{layer}H{head}.png"
            attention_overlay(load_image(pair.clean_image), hf.relative_map(functions.maps, pair_id, layer, head),
                              target, name, pair.clean_prompt, pair.correct)
            caption = (f"{name} on the clean image of pair {pair_id} "
                       f"({condition_label(pair.task, pair.modality, pair.corruption)}): question “{pair.clean_prompt}”, "
                       f"answer “{pair.correct}” (contrast “{pair.incorrect}”); red: more attention than the average "
                       "head, blue: less.")
            figures.append(f'<figure><img src="figures/{html.escape(target.name)}" alt="{html.escape(caption)}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ("<h3>Attention overlays</h3><div class=\"overlays\">" + "".join(figures) + "</div>") if figures else ""


# --------------------------------------------------------------------------- across models
def comparison_section(analyses: Sequence[ModelAnalysis], tables: Tables, top_k: int) -> Section:
    """Each model's strongest heads per condition side by side, and how many are universal."""
    rows = []
    for analysis in analyses:
        for condition, ranked in analysis.rankings.items():
            top = ranked.head(top_k)
            rows.append({"model": analysis.name, "heads": component_title(*analysis.focus), "condition": condition,
                         "important": int(ranked["important"].sum()), "of": len(ranked),
                         f"top {top_k} (mean |effect|)": ", ".join(
                             f"{head_name(r.layer, r.head)} ({r.mean_abs_effect:.2f})" for r in top.itertuples())})
    counts = pd.DataFrame([{"model": a.name, "universal heads": len(a.universal),
                            "which": ", ".join(a.universal["head"]) if len(a.universal) else "–"} for a in analyses])
    body = ('<p class="note">Where image and text meet: each family\'s heads that read the image (BLIP: text-encoder '
            "cross-attention; image-token LMs: language-model self-attention), by condition.</p>"
            + tables.show("families_compared", pd.DataFrame(rows), "per model and condition: the strongest heads")
            + table_html(counts))
    return Section("Families compared", body)


def selection_section(analyses: Sequence[ModelAnalysis], tables: Tables) -> Section:
    """Every filter's drop counts, per model, task and corruption."""
    counts = [{"model": analysis.name, "task": task, "corruption": corruption, **numbers}
              for analysis in analyses for task, report in analysis.results.selection.items()
              for corruption, numbers in report.get("by_corruption", {}).items()]
    body = ('<p class="note">The selection keeps pairs the model answers right whose corruption flips the answer, '
            "balanced by category and answer order; the summary's table of conditions says what reached each "
            "condition.</p>")
    body += ("<p>Drop counts by filter:</p>"
             + tables.show("selection", pd.DataFrame(counts), "per model, task and corruption: the selection's drop "
                                                              "count by filter")
             if counts else "<p>No selection counts were found beside the pairs files.</p>")
    return Section("Selection counts", body)


def interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(low) else f"{mean:.3f}"
