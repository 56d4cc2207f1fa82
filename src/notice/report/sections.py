"""The report's sections, one model at a time: per task its conditions side by side (noise-free
corruptions beside their Gaussian-noise baselines), universal heads, what the heads do; then the
families compared and the selection counts. Each reads a `ModelAnalysis`, never a model."""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from notice.analysis import head_functions as hf
from notice.analysis.conditions import condition_label, condition_title
from notice.analysis.heads import head_name
from notice.analysis.universal import universal_heads
from notice.io import load_image
from notice.pairs import Pair
from notice.report.figures import Figures, Grid, Panel
from notice.report.html import Section, Tables, table_html

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
def task_section(analysis: ModelAnalysis, task: str, tables: Tables, figures: Figures, top_k: int,
                 prefix: str = "") -> Section:
    """A task's conditions by corrupted modality: which exist and why some are empty, one module figure
    and one head figure with the conditions as columns, and each condition's ranked heads."""
    body = ""
    for modality, group in analysis.conditions[analysis.conditions["task"] == task].groupby("modality", sort=True):
        body += f"<h3>{html.escape(str(modality))} corrupted</h3>" + _condition_list(group)
        shown = group[group["analysed"] > 0]
        if shown.empty:
            continue
        stem = slug(f"{prefix}{task}-{modality}")
        body += _module_figure(analysis, shown, stem, tables, figures)
        body += _head_figure(analysis, shown, stem, figures)
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


def _module_figure(analysis: ModelAnalysis, shown: pd.DataFrame, stem: str, tables: Tables, figures: Figures) -> str:
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
    return figures.add(grid, f"{stem}-modules", caption) + tables.link("module_means")


def _module_panel(means: pd.DataFrame, stream: str, component: str, title: str) -> Panel | None:
    cells = means[(means["stream"] == stream) & (means["component"] == component)] if not means.empty else means
    if cells.empty:
        return None
    pivot = _by_layer(cells, "position", ("mean", "ci_low", "ci_high", "count"))
    labels = cells.drop_duplicates("position").set_index("position")["token"]
    return Panel(pivot["mean"], [str(labels[p]) for p in pivot["mean"].columns], title,
                 {"95% CI low": pivot["ci_low"], "95% CI high": pivot["ci_high"], "pairs": pivot["count"]})


def _by_layer(frame: pd.DataFrame, columns: str, names: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Each of `names` as a layer × `columns` table (one pivot for all: the cells are unique)."""
    wide = frame.pivot(index="layer", columns=columns, values=list(names)).sort_index()
    return {name: wide[name] for name in names}


def _head_panel(ranked: pd.DataFrame, title: str, layers: Sequence[int] | None = None) -> Panel:
    """Ranked heads as a layer × head panel of mean |effect|, the rankings' statistic; with `layers`, a row
    for each (NaN where a layer has no such heads)."""
    pivot = _by_layer(ranked, "head", ("mean_abs_effect", "mean_effect", "ci_low", "ci_high", "samples"))
    if layers is not None:
        pivot = {name: values.reindex(layers) for name, values in pivot.items()}
    return Panel(pivot["mean_abs_effect"], [str(h) for h in pivot["mean_abs_effect"].columns], title,
                 {"signed mean": pivot["mean_effect"], "95% CI low": pivot["ci_low"], "95% CI high": pivot["ci_high"],
                  "pairs": pivot["samples"]})


def _head_figure(analysis: ModelAnalysis, shown: pd.DataFrame, stem: str, figures: Figures) -> str:
    """One panel per condition: each head's mean |effect|, the statistic the rankings sort by."""
    panels: list[Panel | None] = []
    for row in shown.itertuples():
        ranked = analysis.rankings.get(row.condition)
        if ranked is None or ranked.empty:
            panels.append(None)
            continue
        panels.append(_head_panel(ranked, _panel_title(row)))
    if not any(panels):
        return ""
    stream, component = analysis.focus
    grid = Grid(f"{analysis.name}: {shown['task'].iloc[0]}, {shown['modality'].iloc[0]} corrupted: "
                f"{component_title(stream, component)} heads", [panels], ["heads"], "head",
                "mean |normalized effect|", diverging=False)
    caption = (f"Each cell: one {component_title(stream, component)} head's mean over the condition's pairs of "
               f"|normalized effect| {analysis.head_statistic}: the statistic the rankings below sort by (the signed "
               "mean is on hover). "
               f"One colour scale for all panels, 0 to {grid.bound(0):.3g}.")
    return figures.add(grid, f"{stem}-heads", caption)


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
def head_function_section(analysis: ModelAnalysis, tables: Tables, figures: Figures, overlays_per_head: int,
                          prefix: str = "") -> Section:
    functions, measures = analysis.results.head_functions, analysis.head_measures
    assert functions is not None and measures is not None
    focus = focus_heads(analysis)
    focused = focused_measures(analysis)
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
    body += _overlays(analysis, functions, focus, figures, overlays_per_head, prefix)
    return Section(f"{prefix}What the heads do", body)


def _varied(pairs: Sequence[Pair], count: int) -> list[str]:
    """`count` pair ids taken in turn from each condition (task, corruption), so the overlays show several."""
    by_condition: dict[tuple[str, str], list[str]] = {}
    for pair in pairs:
        by_condition.setdefault((pair.task, pair.corruption), []).append(pair.id)
    in_turn = [ids[i] for i in range(max(map(len, by_condition.values()), default=0))
               for ids in by_condition.values() if i < len(ids)]
    return in_turn[:count]


def focused_measures(analysis: ModelAnalysis) -> pd.DataFrame:
    """The head-function measures of the heads in focus (`focus_heads`) that were measured."""
    measures = analysis.head_measures
    if measures is None:
        return pd.DataFrame()
    measured = set(zip(measures["layer"], measures["head"]))
    return measures.set_index(["layer", "head"]).loc[[h for h in focus_heads(analysis) if h in measured]].reset_index()


def _overlays(analysis: ModelAnalysis, functions: hf.HeadFunctions, focus: list[tuple[int, int]], figures: Figures,
              per_head: int, prefix: str) -> str:
    """Overlays of the heads in focus on a few pairs; each (file, caption) is kept on the analysis too,
    for the family comparison to show again."""
    pairs = {p.id: p for p in analysis.results.pairs}
    shown = _varied([pairs[i] for i in dict.fromkeys(functions.maps["pair_id"]) if i in pairs], per_head)
    for layer, head in focus:
        for pair_id in shown:
            pair, name = pairs[pair_id], head_name(layer, head)
            path = figures.overlay(load_image(pair.clean_image), hf.relative_map(functions.maps, pair_id, layer, head),
                                   f"overlay-{slug(prefix + pair_id)}-L{layer}H{head}.png", name, pair.clean_prompt,
                                   pair.correct)
            caption = (f"{name} on the clean image of pair {pair_id} "
                       f"({condition_label(pair.task, pair.modality, pair.corruption)}): question “{pair.clean_prompt}”, "
                       f"answer “{pair.correct}” (contrast “{pair.incorrect}”); red: more attention than the average "
                       "head, blue: less.")
            analysis.overlays.append((path, caption))
    shown_overlays = "".join(overlay_html(path, caption) for path, caption in analysis.overlays)
    return f'<h3>Attention overlays</h3><div class="overlays">{shown_overlays}</div>' if shown_overlays else ""


def overlay_html(path: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# --------------------------------------------------------------------------- across models
def comparison_section(analyses: Sequence[ModelAnalysis], tables: Tables, figures: Figures, top_k: int) -> Section:
    """The families side by side where text meets the image: per condition they share, one heatmap per
    model of its heads in focus on one statistic, a sentence on where the strongest heads sit and each
    model's strongest heads with intervals; then universal heads and what the heads do, per model.
    Everything is read from the analyses the per-model sections show (no effect is recomputed)."""
    kinds = "; ".join(f"{a.name}: {component_title(*a.focus)}" for a in analyses)
    body = ('<p class="note">Where text meets the image in each family: cross-attention heads where a stream has '
            "them (a text encoder's, a Q-Former's, a language model's cross-attention layers), else the language "
            f"model's self-attention heads, which read the image tokens. Here: {html.escape(kinds)}.</p>")
    shared = shared_conditions(analyses)
    alone = sorted({c for a in analyses for c in a.rankings} - set(shared))
    if alone:
        body += (f'<p class="note">Conditions with head effects in one model only, not compared: '
                 f"{html.escape(', '.join(alone))}.</p>")
    for condition, models in shared.items():
        body += (f'<h3 data-comparison="{html.escape(condition)}">{html.escape(condition)} · '
                 f"{html.escape(condition_title(_corruption(models[0], condition)))}</h3>"
                 f'<p class="finding">{html.escape(depth_sentence(condition, models))}</p>'
                 + _comparison_figure(condition, models, figures)
                 + _comparison_rankings(condition, models, tables, top_k))
    if not shared:
        body += "<p>The models share no condition with head effects.</p>"
    body += _comparison_universal(analyses, tables) + _comparison_functions(analyses, tables)
    return Section("Families compared", body)


def shared_conditions(analyses: Sequence[ModelAnalysis]) -> dict[str, list[ModelAnalysis]]:
    """Condition → the models (two or more) with head effects in it, in the report's condition order."""
    order = pd.concat([a.conditions for a in analyses], ignore_index=True).drop_duplicates("condition")
    shared = {}
    for condition in order.sort_values(["task", "modality"], kind="stable")["condition"]:
        models = [a for a in analyses if not a.rankings.get(condition, pd.DataFrame()).empty]
        if len(models) > 1:
            shared[condition] = models
    return shared


def _corruption(analysis: ModelAnalysis, condition: str) -> str:
    return str(analysis.conditions.set_index("condition").loc[condition, "corruption"])


def depth_sentence(condition: str, models: Sequence[ModelAnalysis]) -> str:
    """Where each model's strongest head of a condition sits in its depth, and its important heads' layers."""
    parts, depth = [], {}
    for analysis in models:
        ranked = analysis.rankings[condition]
        top, last = ranked.iloc[0], analysis.layers(analysis.focus[0]) - 1
        depth[analysis.name] = int(top["layer"]) / last if last > 0 else 0.0
        important = sorted({int(layer) for layer in ranked.loc[ranked["important"], "layer"]})
        parts.append(f"{analysis.name}'s ({component_title(*analysis.focus)}) is "
                     f"{head_name(top['layer'], top['head'])} in layer {int(top['layer'])} of 0–{last} "
                     f"({interval(top['mean_abs_effect'], top['ci_low'], top['ci_high'])}"
                     + (f"; important heads in layer{'s' if len(important) > 1 else ''} "
                        f"{', '.join(map(str, important))})" if important else "; no head above mean + 2σ)"))
    earliest, latest = min(depth, key=depth.__getitem__), max(depth, key=depth.__getitem__)
    where = (f"relative depth {depth[earliest]:.2f} for {earliest} up to {depth[latest]:.2f} for {latest}"
             if depth[latest] > depth[earliest] else f"all at relative depth {depth[latest]:.2f}")
    return f"In {condition} the strongest head (mean |effect| [95% CI]) of " + "; ".join(parts) + f": {where}."


def _focus_panel(analysis: ModelAnalysis, condition: str) -> Panel:
    """A model's heads in focus, layer × head over the stream's whole depth: layers without such heads
    (cross-attention on some layers only) are rows of NaN, shown as absent rather than as zero."""
    ranked = analysis.rankings[condition]
    return _head_panel(ranked, f"{analysis.name}: {component_title(*analysis.focus)} heads "
                               f"(n={int(ranked['samples'].max())})", range(analysis.layers(analysis.focus[0])))


def _comparison_figure(condition: str, models: Sequence[ModelAnalysis], figures: Figures) -> str:
    grid = Grid(f"{condition}: the heads where text meets the image, per family",
                [[_focus_panel(analysis, condition) for analysis in models]], ["heads"], "head",
                "mean |normalized effect|", diverging=False)
    caption = (f"One panel per model. Each cell: one head's mean over the condition's pairs of |normalized effect| "
               f"({'; '.join(f'{a.name}: {a.head_statistic}' for a in models)}), the statistic the rankings sort "
               f"by (the signed mean is on hover). One colour scale for all panels, 0 to {grid.bound(0):.3g}. Rows "
               "run over each stream's whole depth: a layer without such heads (a language model's cross-attention "
               "sits on some layers only) is left blank (grey in the PNG/PDF), absent rather than zero.")
    return figures.add(grid, slug(f"compare-{condition}-heads"), caption)


def head_statistic(table: pd.DataFrame, focus: tuple[str, str]) -> str:
    """How a head's effect in one pair is read: patched at every position, or its strongest token's."""
    stream, component = focus
    heads = table[(table["stream"] == stream) & (table["component"] == component) & table["head"].notna()]
    return ("patched at every position at once" if heads["position"].isna().any()
            else "at the token where it is largest for that pair")


def _comparison_rankings(condition: str, models: Sequence[ModelAnalysis], tables: Tables, top_k: int) -> str:
    blocks = []
    for analysis in models:
        ranked = analysis.rankings[condition]
        top = ranked.head(top_k)
        names = [head_name(l, h) for l, h in zip(top["layer"], top["head"])]
        tables.add("families_compared", top.assign(model=analysis.name, heads=component_title(*analysis.focus),
                                                   condition=condition, head_name=names,
                                                   threshold=ranked.attrs["threshold"]),
                   f"per condition the models share and per model: its {top_k} strongest heads where text meets the "
                   "image, by mean |normalized effect|, with 95% bootstrap intervals (rows of head_ranking)")
        shown = pd.DataFrame({"rank": top["rank"], "head": names, "mean |effect|": top["mean_abs_effect"],
                              "95% CI": [f"{lo:.3f}–{hi:.3f}" for lo, hi in zip(top["ci_low"], top["ci_high"])],
                              "signed mean": top["mean_effect"], "important": top["important"]})
        blocks.append(f'<div data-family="{html.escape(analysis.name)}"><p class="note"><b>{html.escape(analysis.name)}'
                      f"</b>: {html.escape(component_title(*analysis.focus))} heads</p>{table_html(shown)}</div>")
    return f'<div class="side">{"".join(blocks)}</div>' + tables.link("families_compared")


def _comparison_universal(analyses: Sequence[ModelAnalysis], tables: Tables) -> str:
    rows = []
    for analysis in analyses:
        n = len(analysis.rankings)
        k = n if analysis.min_conditions is None else analysis.min_conditions
        top = universal_heads(analysis.rankings, analysis.min_conditions, rule="top_k") if n else analysis.universal
        anywhere = universal_heads(analysis.rankings, 1) if n else analysis.universal
        rows.append({"model": analysis.name, "heads": component_title(*analysis.focus), "conditions": n,
                     "important (2σ) in ≥ k": ", ".join(analysis.universal["head"]) or "–", "k": k,
                     "top": _top_k(analysis.rankings) if n else 0, "among the top in ≥ k": ", ".join(top["head"]) or "–",
                     "most shared (2σ)": (f"{anywhere.iloc[0]['head']} ({anywhere.iloc[0]['conditions']} of {n})"
                                          if len(anywhere) else "–")})
    return ("<h3>Universal heads per family</h3>"
            '<p class="note">Heads important in at least k of a model\'s conditions (k = all unless asked), by the '
            "2σ rule and among each condition's strongest; each model's own section lists where.</p>"
            + tables.show("families_universal", pd.DataFrame(rows), "per model: its universal heads by each rule"))


def _comparison_functions(analyses: Sequence[ModelAnalysis], tables: Tables) -> str:
    """Per model: its heads in focus summarised (segmentation, object and outlier inhibition), the
    strongest of each kind, and one of the overlays its own section shows."""
    rows, overlays = [], []
    for analysis in analyses:
        measures = analysis.head_measures
        if measures is None or measures.empty:
            continue
        focused, facts = focused_measures(analysis), analysis.results.head_functions.facts  # type: ignore[union-attr]
        segmenter = measures.loc[measures["mask_iou"].idxmax()] if measures["mask_iou"].notna().any() else None
        rows.append({
            "model": analysis.name, "heads": component_title(facts["stream"], facts["component"]),
            "in focus": ", ".join(focused["head_name"]) or "–",
            "mask IoU (in focus)": focused["mask_iou"].mean(),
            "object inhibition (in focus)": focused["object_inhibition"].mean(),
            "outlier inhibition (in focus)": focused["outlier_inhibition"].mean(),
            "best segmenter": f"{segmenter['head_name']} ({segmenter['mask_iou']:.2f})" if segmenter is not None else "–",
            "strongest object inhibitor": _most(measures, "object_inhibition"),
            "strongest outlier inhibitor": _most(measures, "outlier_inhibition")})
        if analysis.overlays:
            overlays.append(overlay_html(analysis.overlays[0][0], f"{analysis.name}: {analysis.overlays[0][1]}"))
    if not rows:
        return ""
    return ("<h3>What the heads do, per family</h3>"
            '<p class="note">Means over the heads in focus (universal, else each condition\'s important heads) of the '
            "head-function measures; inhibitors: the most negative mass on the object or on outlier patches relative "
            "to the average head. Each model's own section has every head (CSV: head_functions).</p>"
            + tables.show("families_head_functions", pd.DataFrame(rows),
                          "per model: the head-function measures of its heads in focus and its strongest heads of "
                          "each function")
            + (f'<div class="overlays" data-families>{"".join(overlays)}</div>' if overlays else ""))


def _most(measures: pd.DataFrame, column: str) -> str:
    if not measures[column].notna().any():
        return "–"
    row = measures.loc[measures[column].idxmin()]
    return f"{row['head_name']} ({row[column]:.3f})"


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
