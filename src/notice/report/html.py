"""A static HTML report that opens without a network: figures and scripts sit beside it."""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from notice.io import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1d1d1f; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .6rem 0; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; } .figures figure { margin: 0; }
figcaption { font-size: .8rem; color: #555; max-width: 440px; } img { max-width: 100%; }
.figures img { max-width: 440px; }
.note { color: #555; font-size: .9rem; }
"""


@dataclass
class Section:
    title: str
    body: str  # HTML


@dataclass
class Report:
    title: str
    summary: dict[str, str]  # key facts shown at the top
    sections: list[Section] = field(default_factory=list)


def table_html(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    formatters = {c: float_format.format for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}
    return frame.to_html(index=False, escape=True, border=0, formatters=formatters, na_rep="–")


def figure_html(path: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_report(report: Report, out_dir: Path) -> Path:
    """Write index.html with plotly bundled beside it; returns the page's path."""
    import plotly

    out_dir.mkdir(parents=True, exist_ok=True)
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    shutil.copyfile(plotly_js, out_dir / "plotly.min.js")
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in report.summary.items())
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
<table>{facts}</table>
<ol>{toc}</ol>
{body}
</body></html>
"""
    target = out_dir / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps({"title": report.title, "summary": report.summary,
                                   "sections": [s.title for s in report.sections]}, indent=2))
    return target
