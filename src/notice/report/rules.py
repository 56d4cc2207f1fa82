"""The report's section on head-selection rules: the paper's lists beside ours, from tables only."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from notice.analysis import paper_rule as pr
from notice.analysis.heads import head_name
from notice.analysis.universal import universal_heads
from notice.report.html import Section, Tables, table_html

UNSCORED_SHOWN = 20  # unscored pairs listed by name per rule; the CSV beside the report holds all


def rule_section(table: pd.DataFrame, records: dict[str, dict[str, Any]], focus: tuple[str, str],
                 rules: Sequence[str], default_rankings: dict[str, pd.DataFrame], tables: Tables,
                 min_conditions: int | None = None, prefix: str = "", file_prefix: str = "") -> Section:
    """Each asked rule's important heads per condition and universal heads, the pairs each paper
    rule scored and could not score, and (with two rules or more) the lists side by side."""
    stream, component = focus
    body = "".join(f'<p class="note">Rule {pr.RULE_TITLES[rule]}.</p>' for rule in rules)
    sets = {}
    for rule in rules:
        if rule == "default":
            sets[rule] = pr.head_sets(default_rankings, min_conditions)
            continue
        rankings, coverage = pr.rank_by_rule(table, records, stream, component, rule)
        sets[rule] = pr.head_sets(rankings, min_conditions)
        body += (f"<h3>Rule {rule}</h3>"
                 + _rule_tables(tables, f"{file_prefix}{rule}", rule, rankings, coverage, min_conditions)
                 + _write_tables(tables, f"{file_prefix}{rule}", rule, rankings, coverage))
    if len(rules) > 1:
        body += ('<h3>Rules side by side</h3><p class="note">Important heads per condition and universal heads '
                 "by each rule; \"in every rule\" is their overlap.</p>"
                 + tables.show(f"rules-compared{'-' + file_prefix.strip('-') if file_prefix else ''}",
                               pr.compare_rules(sets), "important and universal heads by each rule, side by side"))
    return Section(f"{prefix}Head-selection rules ({', '.join(rules)})", body)


def _rule_tables(tables: Tables, stem: str, rule: str, rankings: dict[str, pd.DataFrame], coverage: pd.DataFrame,
                 min_conditions: int | None) -> str:
    html = "<p>Pairs scored (the rule found the answer word's position) and unscored, per condition:</p>"
    html += tables.show(f"coverage-{stem}", pr.coverage_counts(coverage), f"pairs scored and unscored by rule {rule}")
    lists = pd.DataFrame([{"condition": condition, "threshold": ranked.attrs["threshold"], "heads": len(ranked),
                           "important (mean |p(correct)|)": ", ".join(
                               f"{head_name(r.layer, r.head)} ({r.mean_abs_score:.3g})"
                               for r in ranked[ranked["important"]].itertuples()) or "–"}
                          for condition, ranked in rankings.items()])
    html += f"<p>Important heads by rule {rule}:</p>" + (  # p(correct) of one head can be tiny: 3 digits
        tables.show(f"important-{stem}", lists, f"important heads per condition by rule {rule}", float_format="{:.3g}")
        if not lists.empty else "<p>No pair could be scored.</p>")
    if rankings:
        universal = universal_heads(rankings, min_conditions)
        k = len(rankings) if min_conditions is None else min_conditions
        html += (f"<p>Universal heads by rule {rule} (important in at least {k} of {len(rankings)} conditions):</p>"
                 + (tables.show(f"universal-{stem}", universal, f"universal heads by rule {rule}")
                    if not universal.empty else "<p>None.</p>"))
    unscored = coverage[coverage["reason"] != ""]
    if not unscored.empty:
        html += (f"<p>Unscored pairs ({len(unscored)}; the first {min(len(unscored), UNSCORED_SHOWN)} shown):</p>"
                 + table_html(unscored[["pair_id", "condition", "reason"]].head(UNSCORED_SHOWN)))
    return html


def _write_tables(tables: Tables, stem: str, rule: str, rankings: dict[str, pd.DataFrame],
                  coverage: pd.DataFrame) -> str:
    """The rule's head table and per-pair coverage as CSV beside the report; returns their links."""
    heads = pd.concat([ranked.assign(condition=condition, threshold=ranked.attrs["threshold"])
                       for condition, ranked in rankings.items()], ignore_index=True) if rankings else pd.DataFrame(
        columns=["layer", "head", "mean_abs_score", "pairs", "rank", "important", "condition", "threshold"])
    return (tables.add(f"heads-{stem}", heads, f"heads by rule {rule} per condition, with the threshold")
            + tables.add(f"pairs-{stem}", coverage, f"per pair: the position rule {rule} reads, or why none"))
