"""A static HTML report that opens without a network: figures, tables and scripts sit beside it.

Every figure is shown once (interactive), with its PNG and PDF linked full size; every table the
page shows is also a CSV under tables/, linked from the page and listed in report.json.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from notice.io import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1180px; color: #1d1d1f; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.4rem; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; font-size: .82rem; margin: .6rem 0; }
th, td { border: 1px solid #ccc; padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure.plot { margin: .8rem 0 1.4rem; } figure.plot figcaption, .overlays figcaption { font-size: .82rem; color: #444; }
.overlays { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: .8rem; }
.overlays figure { margin: 0; } .overlays img { width: 100%; }
.side { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
.side > div { flex: 1 1 400px; max-width: 560px; } .side td { white-space: nowrap; }
.note { color: #555; font-size: .9rem; } .csv { font-size: .8rem; }
.summary { background: #f8f8fa; border: 1px solid #e2e2e6; padding: .4rem 1.2rem 1rem; border-radius: 6px; }
.findings li { margin: .3rem 0; } .status-warn { color: #a4410e; }
"""


@dataclass
class Section:
    title: str
    body: str  # HTML


@dataclass
class Figure:
    """One figure: shown once (interactive), with its static files linked."""

    element_id: str
    title: str
    caption: str
    div: str  # the interactive figure's HTML
    files: list[str]  # PNG and PDF, relative to the report

    def html(self) -> str:
        links = " · ".join(f'<a href="{html.escape(f)}">{html.escape(Path(f).suffix[1:].upper())}</a>'
                           for f in self.files)
        return (f'<figure class="plot" data-figure="{html.escape(self.element_id)}">{self.div}'
                f"<figcaption><b>{html.escape(self.title)}.</b> {html.escape(self.caption)} "
                f'<span class="csv">Full size: {links}</span></figcaption></figure>')


class Tables:
    """The report's tables as CSV files under tables/: frames added under one name (several models,
    several conditions) are concatenated into one file when the report is written."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.frames: dict[str, list[pd.DataFrame]] = {}
        self.descriptions: dict[str, str] = {}

    def add(self, name: str, frame: pd.DataFrame, description: str) -> str:
        """Add rows to the CSV `name`; returns the HTML link to it."""
        self.frames.setdefault(name, []).append(frame)
        self.descriptions[name] = description
        return self.link(name)

    def show(self, name: str, frame: pd.DataFrame, description: str, shown: pd.DataFrame | None = None,
             float_format: str = "{:.3f}") -> str:
        """A table on the page (`shown`, else the whole frame) and the whole frame as CSV, linked below it."""
        return table_html(frame if shown is None else shown, float_format) + self.add(name, frame, description)

    def path(self, name: str) -> str:
        return f"tables/{name}.csv"

    def link(self, name: str) -> str:
        return f'<p class="csv">CSV: <a href="{self.path(name)}">{html.escape(self.path(name))}</a></p>'

    def write(self) -> dict[str, dict[str, Any]]:
        """Write every table; returns name → path, description, rows (for report.json)."""
        written = {}
        for name, frames in self.frames.items():
            frame = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(
                not f.empty for f in frames) else frames[0]
            with atomic_path(self.folder / f"{name}.csv") as tmp:
                frame.to_csv(tmp, index=False)
            written[name] = {"path": self.path(name), "description": self.descriptions[name], "rows": len(frame)}
        return written


@dataclass
class Report:
    title: str
    summary: str  # HTML shown at the top, before the contents
    facts: dict[str, Any]  # what the summary says, as data for report.json
    sections: list[Section] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def table_html(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A table with numbers to the right and words to the left; missing values as "–"."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
            return '<td class="num">–</td>'
        if isinstance(value, (bool, np.bool_)):
            return f"<td>{'yes' if value else 'no'}</td>"
        if isinstance(value, (float, np.floating)):
            return f'<td class="num">{float_format.format(value)}</td>'
        if isinstance(value, (int, np.integer)):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_report(report: Report, tables: Tables, out_dir: Path) -> Path:
    """Write index.html with plotly bundled beside it, the CSV tables and report.json; returns the page."""
    import plotly

    out_dir.mkdir(parents=True, exist_ok=True)
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    shutil.copyfile(plotly_js, out_dir / "plotly.min.js")
    written = tables.write()
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(report.sections))
    body = "".join(f'<h2 id="s{i}">{html.escape(s.title)}</h2>{s.body}' for i, s in enumerate(report.sections))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(report.title)}</title>
<style>{STYLE}</style>
<script src="plotly.min.js"></script>
</head><body>
<h1>{html.escape(report.title)}</h1>
<section class="summary" id="summary">{report.summary}</section>
<h2>Contents</h2>
<ol>{toc}</ol>
{body}
</body></html>
"""
    target = out_dir / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps({
            "title": report.title, "summary": report.facts, "sections": [s.title for s in report.sections],
            "tables": written,
            "figures": [{"id": f.element_id, "title": f.title, "caption": f.caption, "files": f.files}
                        for f in report.figures]}, indent=2, default=str) + "\n")
    return target
