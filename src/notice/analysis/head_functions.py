"""What heads do, measured from their attention to the image patches: a step that writes tables.

For each selected clean input, the model adapter gives the attention of the heads where text meets
the image (BLIP: text-encoder cross-attention; image-token LMs: self-attention to the image tokens)
from its query position (BLIP: the answer word in the question; an LM: the last prompt token, where
the answer is read) to the grid patches. Each head is compared with the object's mask and with the
average head:
- implicit segmentation: attention mass inside the mask, and IoU of the top-attended patches
  (as many as the mask covers) with the mask;
- object inhibition: the head's mass on the object minus the average head's (negative: the head
  looks away from the object);
- outlier inhibition: attention on high-norm outlier patches relative to the average head.

`head_function_tables` is the only part that runs a model; the report reads the tables it wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from notice.io import atomic_path, load_image
from notice.pairs import Pair

MEASURES = ["mask_mass", "mask_iou", "object_inhibition", "outlier_mass", "outlier_inhibition"]
MAPS_KEPT = 4  # clean inputs whose per-head attention maps are kept for overlays


@dataclass
class AttentionSample:
    pair_id: str
    patch_attention: np.ndarray  # [layers, heads, patches], the query's attention over the grid patches
    mask: np.ndarray | None  # [patches] in {0, 1}, or None when the task has no mask
    outliers: np.ndarray  # [patches] bool: patch states of unusually high norm
    grid: tuple[int, int]
    layers: tuple[int, ...] | None = None  # the model's layer of each first-axis row; None: 0, 1, ...

    def layer(self, row: int) -> int:
        return row if self.layers is None else self.layers[row]


def patch_mask(mask_image: Image.Image, grid: tuple[int, int], min_coverage: float = 0.5) -> np.ndarray:
    """A pixel mask reduced to patches: a patch is on the object when the mask covers enough of it."""
    pixels = torch.from_numpy(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0)[None, None]
    coverage = F.adaptive_avg_pool2d(pixels, grid)[0, 0].flatten().numpy()
    return (coverage >= min_coverage).astype(np.float64)


@torch.no_grad()
def collect(adapter, pairs: Sequence[Pair], outlier_sigmas: float = 2.0) -> tuple[list[AttentionSample], dict]:
    """Run each pair's clean input once and keep its query's attention over the grid patches; also
    says which stream and component the heads belong to."""
    samples, facts = [], {}
    for pair in pairs:
        seen = adapter.image_attention(load_image(pair.clean_image), pair.clean_prompt, pair.correct)
        facts = {"stream": seen.stream, "component": seen.component, "model": adapter.name,
                 "grid": [int(n) for n in seen.grid]}  # plain ints for JSON, whatever integer type the family gives
        norms = seen.image_states.norm(dim=-1).cpu().numpy()
        mask_path = pair.metadata.get("clean_mask")
        mask = patch_mask(Image.open(mask_path), seen.grid) if mask_path and Path(mask_path).is_file() else None
        samples.append(AttentionSample(pair.id, seen.weights[:, :, seen.query].cpu().numpy(), mask,
                                       norms > norms.mean() + outlier_sigmas * norms.std(), seen.grid, seen.layers))
    return samples, facts


def _normalized(attention: np.ndarray) -> np.ndarray:
    return attention / np.clip(attention.sum(-1, keepdims=True), 1e-12, None)


def head_function_table(samples: Sequence[AttentionSample]) -> pd.DataFrame:
    """Per (sample, layer, head): segmentation mass and IoU, object and outlier inhibition."""
    records = []
    for s in samples:
        attention = _normalized(s.patch_attention)
        average = attention.mean(axis=(0, 1))  # the average head, [patches]
        layers, heads, _ = attention.shape
        for layer in range(layers):
            for head in range(heads):
                a = attention[layer, head]
                row = {"pair_id": s.pair_id, "layer": s.layer(layer), "head": head,
                       "outlier_mass": float(a[s.outliers].sum()) if s.outliers.any() else np.nan,
                       "outlier_inhibition": (float(a[s.outliers].sum() - average[s.outliers].sum())
                                              if s.outliers.any() else np.nan)}
                if s.mask is not None and s.mask.sum() > 0:
                    on = s.mask > 0
                    top = np.zeros_like(on)
                    top[np.argsort(-a)[:int(on.sum())]] = True
                    row.update(mask_mass=float(a[on].sum()), mask_iou=float((top & on).sum() / (top | on).sum()),
                               object_inhibition=float(a[on].sum() - average[on].sum()))
                records.append(row)
    return pd.DataFrame.from_records(records).reindex(columns=["pair_id", "layer", "head", *MEASURES])


def attention_maps(samples: Sequence[AttentionSample], keep: int = MAPS_KEPT) -> pd.DataFrame:
    """Long table of each head's attention over the patch grid minus the average head's, for the first
    `keep` samples (those with a mask first): pair_id, layer, head, row, col, relative."""
    chosen = sorted(samples, key=lambda s: s.mask is None)[:keep]
    frames = []
    for s in chosen:
        attention = _normalized(s.patch_attention)
        relative = attention - attention.mean(axis=(0, 1))
        layers, heads, patches = relative.shape
        layer, head, patch = np.meshgrid([s.layer(l) for l in range(layers)], np.arange(heads), np.arange(patches),
                                         indexing="ij")
        frames.append(pd.DataFrame({"pair_id": s.pair_id, "layer": layer.ravel(), "head": head.ravel(),
                                    "row": patch.ravel() // s.grid[1], "col": patch.ravel() % s.grid[1],
                                    "relative": relative.ravel()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["pair_id", "layer", "head", "row", "col", "relative"])


def summarize_head_functions(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure per head, over samples."""
    return table.groupby(["layer", "head"])[MEASURES].mean().reset_index()


def relative_map(maps: pd.DataFrame, pair_id: str, layer: int, head: int) -> np.ndarray:
    """One head's attention over the patch grid minus the average head's, [rows, cols]."""
    rows = maps[(maps["pair_id"] == pair_id) & (maps["layer"] == layer) & (maps["head"] == head)]
    grid = np.zeros((int(rows["row"].max()) + 1, int(rows["col"].max()) + 1))
    grid[rows["row"].to_numpy(), rows["col"].to_numpy()] = rows["relative"].to_numpy()
    return grid


# --------------------------------------------------------------------- the step's files
TABLE, MAPS, FACTS = "head_functions.parquet", "attention_maps.parquet", "head_functions.json"


def write_head_functions(adapter, pairs: Sequence[Pair], folder: str | Path) -> Path:
    """Measure every head on the pairs' clean inputs; write the per-sample table, the kept attention
    maps and what they describe (stream, component, grid) into `folder`."""
    folder = Path(folder)
    samples, facts = collect(adapter, pairs)
    with atomic_path(folder / TABLE) as tmp:
        head_function_table(samples).to_parquet(tmp, index=False)
    with atomic_path(folder / MAPS) as tmp:
        attention_maps(samples).to_parquet(tmp, index=False)
    with atomic_path(folder / FACTS) as tmp:  # written last: its presence marks the step done
        tmp.write_text(json.dumps(dict(facts, samples=len(samples)), indent=2) + "\n")
    return folder


@dataclass
class HeadFunctions:
    """What the step wrote, read back for the report."""

    table: pd.DataFrame
    maps: pd.DataFrame
    facts: dict


def read_head_functions(folder: str | Path) -> HeadFunctions | None:
    """The step's tables in `folder`, or None when the step has not run there."""
    folder = Path(folder)
    if not (folder / FACTS).is_file():
        return None
    return HeadFunctions(pd.read_parquet(folder / TABLE), pd.read_parquet(folder / MAPS),
                         json.loads((folder / FACTS).read_text()))
