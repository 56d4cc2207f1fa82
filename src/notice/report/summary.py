"""The top of the report: what was done, what each condition holds, the strongest modules and heads
with intervals, universal heads, and one sentence per finding, every number computed from the tables."""

from __future__ import annotations

import html
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from notice.analysis.conditions import FILTER_REASONS, condition_title, is_baseline
from notice.analysis.heads import head_name, patching_methods, strongest_cell
from notice.analysis.universal import universal_heads
from notice.report.html import Tables
from notice.report.sections import COMPONENT_TITLES, METRIC_TEXT, component_title, directions_text, interval

if TYPE_CHECKING:
    from notice.report.build import ModelAnalysis


def summary(analyses: Sequence[ModelAnalysis], tables: Tables, min_pairs: int) -> tuple[str, dict[str, Any]]:
    """The summary's HTML and the same facts as data (report.json)."""
    conditions = pd.concat([a.conditions.assign(model=a.name) for a in analyses], ignore_index=True)
    directions = sorted(set(conditions["direction"]))
    corruptions = sorted(set(conditions["corruption"]), key=lambda c: (is_baseline(c), c))
    strongest = strongest_effects(analyses)
    found = findings(analyses, strongest, min_pairs)
    facts: dict[str, Any] = {
        "models": [a.name for a in analyses], "tasks": sorted(set(conditions["task"])),
        "corruptions": {c: condition_title(c) for c in corruptions}, "direction": directions,
        "metric": METRIC_TEXT, "min_pairs": min_pairs,
        "conditions": conditions[["model", "condition", "analysed", "status", "reason"]].to_dict("records"),
        "strongest": strongest.to_dict("records"),
        "universal_heads": {a.name: list(a.universal["head"]) if len(a.universal) else [] for a in analyses},
        "findings": found}
    sites = "; ".join(f"{a.name}: {_sites(a)}" for a in analyses)
    methods = sorted({m for a in analyses for m in patching_methods(a.results.table)})
    facts["method"] = methods
    body = ("<h2>Summary</h2>"
            f"<p><b>What was done.</b> {html.escape(_methods_text(methods))} "
            f"({html.escape(directions_text(directions))}) of "
            f"{html.escape(', '.join(a.name for a in analyses))} on {html.escape(', '.join(facts['tasks']))}, with "
            f"the corruptions {html.escape(', '.join(f'{condition_title(c)} ({c})' for c in corruptions))}. "
            f"Sites: {html.escape(sites)}. A condition is a task, the corrupted modality and the corruption, so "
            "Gaussian-noise baselines are never averaged with Semantic Minimal Pairs or Symmetric Token "
            "Replacement.</p>"
            f"<p><b>Metric.</b> The {html.escape(METRIC_TEXT)}. Module effects are means over a condition's pairs; a "
            "head's effect in a pair is its |normalized effect| at the token where it is largest, and heads are ranked "
            "by its mean over pairs. Intervals are 95% percentile bootstrap intervals over pairs (1,000 resamples). "
            "Important heads exceed the mean over heads by 2σ; universal heads are important in every condition (or "
            f"in the k asked for). Conditions with fewer than {min_pairs} pairs are flagged: their intervals are "
            "wide.</p>")
    body += '<h3>Findings</h3><ul class="findings">' + "".join(f"<li>{html.escape(f)}</li>" for f in found) + "</ul>"
    shown = conditions[["model", "condition", "corruption", "analysed", "status", "reason"]].assign(
        corruption=conditions["corruption"].map(condition_title)).rename(columns={"analysed": "pairs"})
    body += ("<h3>Conditions</h3>"
             + tables.show("conditions", conditions[["model", "condition", "task", "modality", "corruption",
                                                     "direction", "input", "selected", "patched", "analysed",
                                                     "status", "reason"]],
                           "per model and condition: pairs into the selection, selected, patched and analysed (a "
                           "defined effect); status and the reason from the selection's drop counts", shown=shown)
             + '<p class="note">Selection filters: ' + html.escape("; ".join(
                 f"{name}: {why}" for name, why in FILTER_REASONS.items())) + ".</p>")
    if not strongest.empty:
        body += ("<h3>Strongest module and head per condition</h3>"
                 + tables.show("strongest", strongest, "per model and condition: the module cell with the largest "
                                                       "|mean effect| and the head with the largest mean |effect|, "
                                                       "with 95% bootstrap intervals, and the important heads",
                               shown=_strongest_shown(strongest)))
    body += "<h3>Universal heads</h3><ul>" + "".join(f"<li>{html.escape(_universal_line(a))}</li>" for a in analyses)
    body += "</ul>" + tables.link("universal_heads")
    body += "<h3>Tables (CSV)</h3><ul>" + "".join(
        f'<li><a href="{tables.path(name)}">{html.escape(tables.path(name))}</a>: {html.escape(description)}</li>'
        for name, description in sorted(tables.descriptions.items())) + "</ul>"
    return body, facts


METHOD_TITLES = {"exact": "activation patching, one patched run per cell",
                 "atp": "attribution patching (AtP): each cell's effect estimated to first order from one backward",
                 "atp*": "attribution patching (AtP*): first-order estimates with exact attention patterns and "
                         "GradDrop"}


def _methods_text(methods: Sequence[str]) -> str:
    text = "; ".join(METHOD_TITLES.get(m, m) for m in methods)
    return text[0].upper() + text[1:] + ("" if methods == ["exact"] else ". Effects below are these estimates")


def _sites(analysis: ModelAnalysis) -> str:
    table = analysis.results.table
    modules = table[table["head"].isna()]
    parts = [f"{stream} {', '.join(COMPONENT_TITLES.get(c, c) for c in _ordered(set(rows['component'])))}"
             for stream, rows in modules.groupby("stream", sort=True)]
    heads = table[table["head"].notna()]
    kinds = sorted(set(zip(heads["stream"], heads["component"])), key=lambda kind: kind != analysis.focus)
    if kinds:  # the heads in focus first
        parts.append(" and ".join(f"every {component_title(stream, component)} head" for stream, component in kinds))
    return " and ".join(parts) + " at every token patched"


def _ordered(components: set[str]) -> list[str]:
    order = {c: i for i, c in enumerate(COMPONENT_TITLES)}
    return sorted(components, key=lambda c: (order.get(c, 99), c))


def strongest_effects(analyses: Sequence[ModelAnalysis]) -> pd.DataFrame:
    """Per model and analysed condition: its strongest module cell and head, with intervals."""
    rows = []
    for analysis in analyses:
        for condition in analysis.conditions.loc[analysis.conditions["analysed"] > 0, "condition"]:
            row: dict[str, Any] = {"model": analysis.name, "condition": condition}
            cell = strongest_cell(analysis.means.get(condition, pd.DataFrame()))
            if cell is not None:
                row.update(module_stream=cell["stream"], module_component=cell["component"],
                           module_layer=int(cell["layer"]), module_token=cell["token"], module_mean=cell["mean"],
                           module_ci_low=cell["ci_low"], module_ci_high=cell["ci_high"], pairs=int(cell["count"]))
            ranked = analysis.rankings.get(condition)
            if ranked is not None and not ranked.empty:
                top = ranked.iloc[0]
                row.update(head=head_name(top["layer"], top["head"]), head_mean_abs=top["mean_abs_effect"],
                           head_ci_low=top["ci_low"], head_ci_high=top["ci_high"],
                           important_heads=", ".join(head_name(r.layer, r.head)
                                                     for r in ranked[ranked["important"]].itertuples()) or "–")
            rows.append(row)
    return pd.DataFrame(rows)


def _module_name(row: Any) -> str:
    return (f"{row['module_stream']} L{int(row['module_layer'])} "
            f"{COMPONENT_TITLES.get(row['module_component'], row['module_component'])} at “{row['module_token']}”")


def _strongest_shown(strongest: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame({"model": strongest["model"], "condition": strongest["condition"]})
    if "module_mean" in strongest:
        has = strongest["module_mean"].notna()
        shown["strongest module"] = [_module_name(r) if h else "–" for (_, r), h in zip(strongest.iterrows(), has)]
        shown["mean effect [95% CI]"] = [interval(r.module_mean, r.module_ci_low, r.module_ci_high) if h else "–"
                                         for r, h in zip(strongest.itertuples(), has)]
    if "head" in strongest:
        has = strongest["head"].notna()
        shown["strongest head"] = strongest["head"].fillna("–")
        shown["mean |effect| [95% CI]"] = [interval(r.head_mean_abs, r.head_ci_low, r.head_ci_high) if h else "–"
                                           for r, h in zip(strongest.itertuples(), has)]
        shown["important heads"] = strongest["important_heads"].fillna("–")
    return shown


def _universal_line(analysis: ModelAnalysis) -> str:
    n = len(analysis.rankings)
    k = n if analysis.min_conditions is None else analysis.min_conditions
    heads = component_title(*analysis.focus)
    if not n:
        return f"{analysis.name}: no {heads} heads were patched."
    if len(analysis.universal):
        return (f"{analysis.name}: {', '.join(analysis.universal['head'])} — important ({heads}, mean + 2σ) in at "
                f"least {k} of {n} conditions.")
    anywhere = universal_heads(analysis.rankings, 1)
    if anywhere.empty:
        return f"{analysis.name}: no {heads} head passes mean + 2σ in any of the {n} conditions."
    best = anywhere.iloc[0]
    return (f"{analysis.name}: no {heads} head is important in {k} of {n} conditions; the most shared is "
            f"{best['head']} ({best['conditions']} of {n}: {best['where']}).")


# --------------------------------------------------------------------------------- findings
def findings(analyses: Sequence[ModelAnalysis], strongest: pd.DataFrame, min_pairs: int) -> list[str]:
    """One sentence per finding, each computed from the tables."""
    found = []
    for analysis in analyses:
        found += _layer_findings(analysis)
        found += _baseline_findings(analysis)
        found += _head_findings(analysis, strongest)
    if len(analyses) > 1:
        found += _depth_findings(analyses)
    conditions = pd.concat([a.conditions for a in analyses], ignore_index=True)
    empty, few = (conditions["status"] == "no pairs").sum(), conditions["status"].str.startswith("too few").sum()
    if empty or few:
        parts = ([f"{_count(few, 'condition')} fewer than {min_pairs} pairs"] if few else []) + (
            [f"{_count(empty, 'condition')} none"] if empty else [])
        found.append(f"Of {len(conditions)} conditions, {' and '.join(parts)}; the table of conditions below gives "
                     "each one's reason from the selection counts.")
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun} has" if n == 1 else f"{n} {noun}s have"


def _layer_findings(analysis: ModelAnalysis) -> list[str]:
    """Which layer carries most of the attention and MLP effect, per condition, grouped by layer."""
    places: dict[tuple[str, int], list[str]] = {}
    what = ""
    for condition in analysis.conditions.loc[analysis.conditions["analysed"] > 0, "condition"]:
        means = analysis.means.get(condition, pd.DataFrame())
        if means.empty:
            continue
        modules = means[means["component"] != "layer"]
        modules = modules if not modules.empty else means
        by_layer = modules.assign(size=modules["mean"].abs()).groupby(["stream", "layer"])["size"].sum()
        if not by_layer.sum() > 0:
            continue
        stream, layer = by_layer.idxmax()
        places.setdefault((str(stream), int(layer)), []).append(f"{condition} ({by_layer.max() / by_layer.sum():.0%})")
        what = ", ".join(COMPONENT_TITLES.get(c, c) for c in _ordered(set(modules["component"])))
    if not places:
        return []
    where = "; ".join(f"{stream} layer {layer} of 0–{analysis.layers(stream) - 1} in {', '.join(conditions)}"
                      for (stream, layer), conditions in places.items())
    return [f"{analysis.name}: most of the module effect ({what}; share of the summed |mean effect| over layers and "
            f"tokens) sits in {where}."]


def _baseline_findings(analysis: ModelAnalysis) -> list[str]:
    """Gaussian noise against the noise-free corruption of the same task and modality."""
    found = []
    shown = analysis.conditions[analysis.conditions["analysed"] > 0]
    for (task, modality, _), group in shown.groupby(["task", "modality", "direction"], sort=True):
        baselines = group[group["corruption"].map(is_baseline)]
        for base in baselines.itertuples():
            for other in group[~group["corruption"].map(is_baseline)].itertuples():
                b = strongest_cell(analysis.means.get(base.condition, pd.DataFrame()))
                o = strongest_cell(analysis.means.get(other.condition, pd.DataFrame()))
                if b is None or o is None:
                    continue
                same = (b["stream"], b["component"], b["layer"], b["token"]) == (
                    o["stream"], o["component"], o["layer"], o["token"])
                ratio = abs(b["mean"]) / abs(o["mean"]) if o["mean"] else np.inf
                found.append(
                    f"{analysis.name}, {task}, {modality} corrupted: the strongest module effect is "
                    f"{_cell(b)} under Gaussian noise against {_cell(o)} under {condition_title(other.corruption)} "
                    f"({ratio:.2f}×; {'the same module leads both' if same else 'different modules lead'}); module "
                    f"cells at ≥ half of the condition's largest effect: {_spread(analysis.means[base.condition])} "
                    f"under noise, {_spread(analysis.means[other.condition])} under "
                    f"{condition_title(other.corruption)}.")
    return found


def _cell(cell: pd.Series) -> str:
    name = COMPONENT_TITLES.get(cell["component"], cell["component"])
    return (f"{cell['stream']} L{int(cell['layer'])} {name} at “{cell['token']}” "
            f"{interval(cell['mean'], cell['ci_low'], cell['ci_high'])}")


def _spread(means: pd.DataFrame) -> int:
    modules = means[means["component"] != "layer"]
    modules = modules if not modules.empty else means
    size = modules["mean"].abs()
    return int((size >= 0.5 * size.max()).sum()) if size.max() > 0 else 0


def _head_findings(analysis: ModelAnalysis, strongest: pd.DataFrame) -> list[str]:
    if strongest.empty or "head" not in strongest:
        return []
    rows = strongest[(strongest["model"] == analysis.name) & strongest["head"].notna()]
    if rows.empty:
        return []
    heads = component_title(*analysis.focus)
    if len(rows) > 1 and rows["head"].nunique() == 1:
        return [f"{analysis.name}: {rows['head'].iloc[0]} is the strongest {heads} head in every one of the "
                f"{len(rows)} conditions (mean |effect| {rows['head_mean_abs'].min():.3f}–"
                f"{rows['head_mean_abs'].max():.3f})."]
    return [f"{analysis.name}: the strongest {heads} head is "
            + "; ".join(f"{r.head} in {r.condition} ({interval(r.head_mean_abs, r.head_ci_low, r.head_ci_high)})"
                        for r in rows.itertuples()) + "."]


def _depth_findings(analyses: Sequence[ModelAnalysis]) -> list[str]:
    """Where each family's strongest heads sit, as a layer of its depth."""
    parts = []
    for analysis in analyses:
        layers = [int(ranked.iloc[0]["layer"]) for ranked in analysis.rankings.values() if not ranked.empty]
        if not layers:
            continue
        layer, count = Counter(layers).most_common(1)[0]
        stream = analysis.focus[0]
        parts.append(f"{analysis.name}'s in {stream} layer {layer} of 0–{analysis.layers(stream) - 1} "
                     f"({count} of {len(layers)} conditions)")
    return ["The strongest heads sit: " + "; ".join(parts) + "."] if len(parts) > 1 else []
