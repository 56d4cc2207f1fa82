"""Figures of the report: grids of heatmaps (interactive, and PNG/PDF files) and attention overlays.

A grid's rows share one colour scale and its columns are conditions: the same component under SMP and
under its Gaussian-noise baseline is read on one scale. Rows whose effects differ by orders of
magnitude (a layer's output against its self-attention) each get their own colour bar, labelled.
"""

from __future__ import annotations

import re
import textwrap
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from PIL import Image  # noqa: E402

from notice.io import atomic_path  # noqa: E402
from notice.report.html import Figure  # noqa: E402

DIVERGING, SEQUENTIAL = "RdBu_r", "Reds"
ABSENT = "#d4d4d8"  # cells with no value (no such head, or a token a prompt lacks), never white as zero
CELL_PX, MAX_WIDTH_PX = 44, 1100  # interactive cells: width of one column; wider grids fill the page
TITLE_PX = 48  # a colour bar's three-line title


@dataclass
class Panel:
    """One heatmap of a grid: layers (index) × positions or heads (columns)."""

    values: pd.DataFrame
    xlabels: list[str]
    title: str
    hover: dict[str, pd.DataFrame] = field(default_factory=dict)  # more values per cell, same shape


@dataclass
class Grid:
    """Rows of panels sharing a colour scale per row; a None panel leaves its place empty."""

    title: str
    rows: list[list[Panel | None]]
    row_titles: list[str]
    xlabel: str  # under the last row; "" for none (token labels speak for themselves)
    colorbar: str
    diverging: bool = True  # centred at zero; else from zero up (magnitudes)

    def columns(self) -> int:
        return max(len(row) for row in self.rows)

    def heights(self) -> list[int]:
        """Layers per row."""
        return [max((len(p.values.index) for p in row if p is not None), default=1) for row in self.rows]

    def column_panels(self, column: int) -> list[Panel]:
        return [panel for row in self.rows if column < len(row) and (panel := row[column]) is not None]

    def column_title(self, column: int) -> str:
        panels = self.column_panels(column)
        return panels[0].title if panels else ""

    def column_labels(self, column: int) -> list[str]:
        """A column's x labels (its rows show one condition: the same tokens or heads)."""
        panels = self.column_panels(column)
        return max((p.xlabels for p in panels), key=len) if panels else []

    def longest_label(self) -> int:
        return max((len(label) for c in range(self.columns()) for label in self.column_labels(c)), default=1)

    def bound(self, row: int) -> float:
        """The largest |value| of a row: its colour scale runs to ± this (or 0 to this)."""
        values = [np.abs(p.values.to_numpy(dtype=float)) for p in self.rows[row] if p is not None]
        finite = [v[np.isfinite(v)] for v in values]
        largest = max((float(v.max()) for v in finite if v.size), default=0.0)
        return largest or 1.0


def _norm(grid: Grid, row: int) -> Normalize:
    bound = grid.bound(row)
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound) if grid.diverging else Normalize(0.0, bound)


def static_grid(grid: Grid, out_stem: Path) -> list[Path]:
    """The grid as PNG and PDF, sized to its cells (long prompts give wide figures, never squeezed).

    Axes are placed by hand, in inches: matplotlib's automatic layouts measure every label and cost
    seconds per figure."""
    columns = grid.columns()
    widths = [0.26 * max(len(grid.column_labels(c)), 1) + 0.4 for c in range(columns)]
    heights = [0.26 * h + 0.2 for h in grid.heights()]
    left, gap, bar, right, above = 1.1, 0.45, 0.15, 0.8, 0.15
    below = 0.35 + 0.065 * min(grid.longest_label(), 24)  # rotated tick labels under the last row
    width = left + sum(widths) + gap * (columns - 1) + 0.25 + bar + right
    title = textwrap.fill(grid.title, int(width * 12))
    panel_titles = [textwrap.fill(grid.column_title(c), int(widths[c] * 13) + 8) for c in range(columns)]
    # room above the panels for the title and the longest panel title, in lines of 10 and 8 points
    top = 0.2 + 0.19 * (title.count("\n") + 1) + 0.15 * max((t.count("\n") + 1 for t in panel_titles), default=0)
    height = top + sum(heights) + above * (len(heights) - 1) + below
    fig = plt.figure(figsize=(width, height))
    cmap = plt.get_cmap(DIVERGING if grid.diverging else SEQUENTIAL).with_extremes(bad=ABSENT)  # NaN: not measured
    y = height - top
    for r, row in enumerate(grid.rows):
        y -= heights[r]
        norm, image, x = _norm(grid, r), None, left
        for c in range(columns):
            panel = row[c] if c < len(row) else None
            if panel is not None:
                ax = fig.add_axes((x / width, y / height, widths[c] / width, heights[r] / height))
                values = panel.values.to_numpy(dtype=float)
                image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
                last = r == len(grid.rows) - 1
                if last:  # rows above show no labels: no ticks to lay out either
                    ax.set_xticks(range(values.shape[1]), [label[:24] for label in panel.xlabels], rotation=90,
                                  fontsize=7)
                else:
                    ax.set_xticks([])
                ax.set_yticks(range(values.shape[0]), [str(i) for i in panel.values.index], fontsize=7)
                ax.tick_params(length=0)  # cells are labelled: tick marks would only cost drawing time
                if last and grid.xlabel:
                    ax.set_xlabel(grid.xlabel, fontsize=8)
                if r == 0:
                    ax.set_title(panel_titles[c], fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{grid.row_titles[r]}\nlayer", fontsize=8)
            x += widths[c] + gap
        if image is not None:
            cax = fig.add_axes(((x - gap + 0.25) / width, y / height, bar / width, heights[r] / height))
            fig.colorbar(image, cax=cax).set_label(grid.colorbar if len(grid.rows) == 1 else "", fontsize=7)
            cax.tick_params(labelsize=7)
        y -= above
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    written = []
    for suffix in (".png", ".pdf"):
        target = out_stem.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=130)
        written.append(target)
    plt.close(fig)
    return written


def interactive_grid(grid: Grid, element_id: str) -> str:
    """The grid as one plotly figure (an HTML <div>); hovering a cell shows its value and the panel's
    extra values (interval, samples). The plotly library itself is bundled beside the report."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    columns, heights = grid.columns(), [24 * h for h in grid.heights()]
    angle = -45 if grid.longest_label() > 3 else 0  # token labels slanted, head numbers level
    gap, top, bottom = 30, 90 if len(grid.rows) == 1 else 70, 30 + 5 * min(grid.longest_label(), 24)
    height = sum(heights) + gap * (len(heights) - 1)
    left, right = 80, 90
    # narrow grids (a few heads) keep square-ish cells rather than stretching over the page; a panel
    # is never narrower than its title
    natural = left + right + sum(max(CELL_PX * len(grid.column_labels(c)), 240) for c in range(columns)) \
        + 40 * (columns - 1)
    figure = make_subplots(rows=len(grid.rows), cols=columns, row_heights=heights, horizontal_spacing=0.05,
                           subplot_titles=[textwrap.fill(grid.column_title(c), 36).replace("\n", "<br>")
                                           for c in range(columns)]
                           + [""] * columns * (len(grid.rows) - 1),
                           vertical_spacing=gap / height if len(heights) > 1 else 0.0)
    titled = len(grid.rows) == 1  # several rows' bars would crowd their titles: the caption names them
    for r, row in enumerate(grid.rows):
        axis = f"coloraxis{r + 1 if r else ''}"
        for c, panel in enumerate(row):
            if panel is None:
                continue
            hover_names = list(panel.hover)
            custom = np.dstack([panel.hover[n].to_numpy(dtype=float) for n in hover_names]) if hover_names else None
            extra = "".join(f"<br>{name} %{{customdata[{i}]:.3g}}" for i, name in enumerate(hover_names))
            figure.add_trace(go.Heatmap(
                z=panel.values.to_numpy(dtype=float), x=list(range(len(panel.xlabels))),
                y=[str(i) for i in panel.values.index], customdata=custom, coloraxis=axis,
                text=[list(panel.xlabels)] * len(panel.values.index),
                hovertemplate=f"{grid.row_titles[r]}, layer %{{y}}, %{{text}}<br>{grid.colorbar} %{{z:.3g}}{extra}"
                              "<extra></extra>"), row=r + 1, col=c + 1)
            figure.update_xaxes(tickvals=list(range(len(panel.xlabels))), ticktext=list(panel.xlabels),
                                showticklabels=r == len(grid.rows) - 1, tickfont_size=10, tickangle=angle,
                                row=r + 1, col=c + 1,
                                title_text=grid.xlabel if r == len(grid.rows) - 1 and grid.xlabel else None)
            figure.update_yaxes(title_text=f"{grid.row_titles[r]}<br>layer" if c == 0 else None, title_font_size=11,
                                row=r + 1, col=c + 1)
        domain = figure.get_subplot(r + 1, 1).yaxis.domain
        bound = grid.bound(r)
        figure.update_layout({axis: dict(
            colorscale="RdBu" if grid.diverging else "Reds", reversescale=grid.diverging,
            cmin=-bound if grid.diverging else 0.0, cmax=bound, cmid=0.0 if grid.diverging else None,
            # the bar as tall as its row, from the row's bottom; a title (one row only) sits above it, in the margin
            colorbar=dict(y=domain[0], yanchor="bottom", len=heights[r] + (TITLE_PX if titled else 0),
                          lenmode="pixels", thickness=12, tickfont_size=10, exponentformat="e",  # 1e-4, not "100µ"
                          title=dict(text=grid.colorbar.replace(" ", "<br>") if titled else "", side="top",
                                     font_size=10)))})
    figure.update_annotations(font_size=12)
    figure.update_layout(margin=dict(l=left, r=right, t=top, b=bottom), showlegend=False,
                         height=height + top + bottom, width=natural if natural < MAX_WIDTH_PX else None)
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=element_id)


def attention_overlay(image: Image.Image, relative: np.ndarray, target: Path, head: str, question: str,
                      answer: str, image_kind: str = "clean") -> Path:
    """A head's attention minus the average head's over the image it read, diverging colours centred
    at zero, titled with the image, question, answer and head."""
    fig = plt.figure(figsize=(5.2, 3.0))
    # axes placed by hand (fractions of the figure): tight_layout measures every text and costs more than the drawing
    axes = [fig.add_axes((0.02, 0.03, 0.4, 0.76)), fig.add_axes((0.46, 0.03, 0.4, 0.76))]
    axes[0].imshow(image)
    axes[0].set_title(f"{image_kind} image", fontsize=8)
    axes[1].imshow(image)
    bound = float(np.nanmax(np.abs(relative))) or 1.0
    shown = axes[1].imshow(relative, cmap=DIVERGING, norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound),
                           alpha=0.6, extent=(0, image.width, image.height, 0), interpolation="nearest")
    axes[1].set_title(f"{head} minus average head", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, cax=fig.add_axes((0.88, 0.03, 0.025, 0.76))).ax.tick_params(labelsize=7)
    fig.suptitle(textwrap.fill(f"Q: {question}  A: {answer}", 60), fontsize=8, y=0.97)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


class Figures:
    """The report's figures: each grid shown once (interactive) with its PNG/PDF linked, and the
    overlays. Every figure is drawn in worker processes (one per usable core) from the moment it is
    asked for, while the parent builds the rest of the report: drawing is most of a report's time, and
    one figure's shares nothing with another's. The page holds a placeholder for each interactive
    figure until `finish` fills it in; file paths are known at once. Use as a context manager."""

    def __init__(self, out_dir: Path, workers: int | None = None) -> None:
        import multiprocessing

        import plotly.graph_objects  # noqa: F401  (imported once here, not in every worker)

        self.out_dir = out_dir
        self.shown: list[Figure] = []
        self.files: list[Future] = []
        self.divs: dict[str, Future] = {}
        self.workers = workers or _usable_cores()
        self.pool: ProcessPoolExecutor | None = None
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: the workers need only what is imported already, and start in milliseconds
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))

    def __enter__(self) -> Figures:
        return self

    def __exit__(self, *error: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _submit(self, function: Callable[..., Any], *arguments: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(function, *arguments)
        done: Future = Future()  # one core: draw here and now
        done.set_result(function(*arguments))
        return done

    def add(self, grid: Grid, element_id: str, caption: str) -> str:
        """The grid as an interactive figure with its static files linked; returns its HTML."""
        self.files.append(self._submit(static_grid, grid, self.out_dir / "figures" / element_id))
        self.divs[element_id] = self._submit(interactive_grid, grid, element_id)
        figure = Figure(element_id, grid.title, caption, _placeholder(element_id),
                        [f"figures/{element_id}{suffix}" for suffix in (".png", ".pdf")])
        self.shown.append(figure)
        return figure.html()

    def overlay(self, image: Image.Image, relative: np.ndarray, name: str, head: str, question: str,
                answer: str, image_kind: str = "clean") -> str:
        """An attention overlay (`attention_overlay`); returns its path in the report."""
        self.files.append(self._submit(attention_overlay, image, relative, self.out_dir / "figures" / name, head,
                                       question, answer, image_kind))
        return f"figures/{name}"

    def finish(self, pages: Sequence[str]) -> list[str]:
        """Wait for every figure (a worker's error is raised here); returns `pages` (HTML) with the
        interactive figures in place of their placeholders."""
        for file in self.files:
            file.result()
        divs = {element_id: div.result() for element_id, div in self.divs.items()}
        for figure in self.shown:
            figure.div = divs[figure.element_id]
        return [re.sub(PLACEHOLDER, lambda match: divs[match.group(1)], page) for page in pages]


PLACEHOLDER = r"<!--notice-figure:([^>]*?)-->"


def _placeholder(element_id: str) -> str:
    return f"<!--notice-figure:{element_id}-->"


def _usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
