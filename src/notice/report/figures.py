"""Figures of the report: heatmaps (PNG, PDF, interactive) and attention overlays."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from PIL import Image  # noqa: E402

from notice.io import atomic_path  # noqa: E402

DIVERGING = "RdBu_r"


def _symmetric_norm(values: np.ndarray) -> TwoSlopeNorm:
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    bound = bound or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def heatmap(mean: pd.DataFrame, title: str, xlabel: str, xticklabels: Sequence[str], out_stem: Path,
            colorbar_label: str = "normalized effect") -> list[Path]:
    """A layer × (position or head) heatmap, centred at zero, saved as PNG and PDF."""
    values = mean.to_numpy(dtype=float)
    width = max(4.0, 0.45 * values.shape[1] + 2.0)
    height = max(3.0, 0.35 * values.shape[0] + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(values, cmap=DIVERGING, norm=_symmetric_norm(values), aspect="auto", origin="lower")
    ax.set_xticks(range(values.shape[1]), list(xticklabels), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), [str(i) for i in mean.index], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(textwrap.fill(title, width=max(30, int(width * 9))), fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    written = []
    for suffix in (".png", ".pdf"):
        target = out_stem.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=130)
        written.append(target)
    plt.close(fig)
    return written


def interactive_heatmap(views: dict[str, pd.DataFrame], title: str, xlabel: str, xticklabels: Sequence[str],
                        element_id: str) -> str:
    """A plotly heatmap as an HTML <div>; hovering shows the mean, the sample count and the spread.

    The plotly library itself is bundled beside the report (no network)."""
    import plotly.graph_objects as go

    mean, std, count = views["mean"], views["std"], views["count"]
    custom = np.dstack([count.to_numpy(dtype=float), std.to_numpy(dtype=float)])
    bound = float(np.nanmax(np.abs(mean.to_numpy(dtype=float)))) or 1.0
    figure = go.Figure(go.Heatmap(
        z=mean.to_numpy(dtype=float), x=list(xticklabels), y=[f"layer {i}" for i in mean.index],
        customdata=custom, colorscale="RdBu", reversescale=True, zmid=0, zmin=-bound, zmax=bound,
        hovertemplate="%{y}, %{x}<br>mean %{z:.3f}<br>samples %{customdata[0]:.0f}<br>std %{customdata[1]:.3f}"
                      "<extra></extra>"))
    figure.update_layout(title=title, xaxis_title=xlabel, margin=dict(l=60, r=20, t=50, b=80), height=420)
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=element_id)


def attention_overlay(image: Image.Image, relative: np.ndarray, title: str, target: Path) -> Path:
    """A head's attention minus the average head's, over the image, diverging colours centred at zero."""
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(image)
    shown = axes[1].imshow(relative, cmap=DIVERGING, norm=_symmetric_norm(relative), alpha=0.6,
                           extent=(0, image.width, image.height, 0), interpolation="nearest")
    axes[1].set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target
