"""What heads do, measured from their cross-attention to the image patches.

For the adapter's query token (BLIP: the answer word in the question; LLaVA: the last prompt
token, where the answer is read out), each head's attention over the
image patches is compared with the object's mask and with the average head:
- implicit segmentation: attention mass inside the mask, and IoU of the top-attended patches
  (as many as the mask covers) with the mask;
- object inhibition: the head's mass on the object minus the average head's (negative: the head
  looks away from the object);
- outlier inhibition: attention on high-norm outlier patches relative to the average head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from notice.io import load_image
from notice.pairs import Pair


@dataclass
class AttentionSample:
    pair_id: str
    image: Image.Image
    patch_attention: np.ndarray  # [layers, heads, patches], the query's attention over patches
    mask: np.ndarray | None  # [patches] in {0, 1}, or None when the task has no mask
    outliers: np.ndarray  # [patches] bool: patch states of unusually high norm
    grid: tuple[int, int]


def patch_mask(mask_image: Image.Image, grid: tuple[int, int], min_coverage: float = 0.5) -> np.ndarray:
    """A pixel mask reduced to patches: a patch is on the object when the mask covers enough of it."""
    pixels = torch.from_numpy(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0)[None, None]
    coverage = F.adaptive_avg_pool2d(pixels, grid)[0, 0].flatten().numpy()
    return (coverage >= min_coverage).astype(np.float64)


@torch.no_grad()
def collect(adapter, pairs: Sequence[Pair], outlier_sigmas: float = 2.0) -> list[AttentionSample]:
    """Run each pair's clean input once and keep the query token's attention over the patches."""
    rows, cols, _ = adapter.patch_grid
    samples = []
    for pair in pairs:
        image = load_image(pair.clean_image)
        maps, image_states = adapter.cross_attention([image], [pair.clean_prompt])
        query = adapter.attention_query(pair.clean_prompt, pair.correct)
        attention = maps[0, :, :, query, 1:].numpy()  # drop the image [CLS] token: patches only
        norms = image_states[0, 1:].norm(dim=-1).numpy()
        outliers = norms > norms.mean() + outlier_sigmas * norms.std()
        mask_path = pair.metadata.get("clean_mask")
        mask = patch_mask(Image.open(mask_path), (rows, cols)) if mask_path and Path(mask_path).is_file() else None
        samples.append(AttentionSample(pair.id, image, attention, mask, outliers, (rows, cols)))
    return samples


def head_function_table(samples: Sequence[AttentionSample]) -> pd.DataFrame:
    """Per (sample, layer, head): segmentation mass and IoU, object and outlier inhibition."""
    records = []
    for s in samples:
        attention = s.patch_attention / np.clip(s.patch_attention.sum(-1, keepdims=True), 1e-12, None)
        average = attention.mean(axis=(0, 1))  # the average head, [patches]
        layers, heads, _ = attention.shape
        for layer in range(layers):
            for head in range(heads):
                a = attention[layer, head]
                row = {"pair_id": s.pair_id, "layer": layer, "head": head,
                       "outlier_mass": float(a[s.outliers].sum()) if s.outliers.any() else np.nan,
                       "outlier_inhibition": (float(a[s.outliers].sum() - average[s.outliers].sum())
                                              if s.outliers.any() else np.nan)}
                if s.mask is not None and s.mask.sum() > 0:
                    on = s.mask > 0
                    k = int(on.sum())
                    top = np.zeros_like(on)
                    top[np.argsort(-a)[:k]] = True
                    row.update(mask_mass=float(a[on].sum()),
                               mask_iou=float((top & on).sum() / (top | on).sum()),
                               object_inhibition=float(a[on].sum() - average[on].sum()))
                records.append(row)
    columns = ["pair_id", "layer", "head", "mask_mass", "mask_iou", "object_inhibition", "outlier_mass",
               "outlier_inhibition"]
    return pd.DataFrame.from_records(records).reindex(columns=columns)


def summarize_head_functions(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure per head, over samples."""
    measures = ["mask_mass", "mask_iou", "object_inhibition", "outlier_mass", "outlier_inhibition"]
    return table.groupby(["layer", "head"])[measures].mean().reset_index()


def relative_map(sample: AttentionSample, layer: int, head: int) -> np.ndarray:
    """The head's attention over the patch grid minus the average head's, [rows, cols]."""
    attention = sample.patch_attention / np.clip(sample.patch_attention.sum(-1, keepdims=True), 1e-12, None)
    difference = attention[layer, head] - attention.mean(axis=(0, 1))
    return difference.reshape(sample.grid)
