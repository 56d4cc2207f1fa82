"""The results table on disk: one Parquet shard per sample (pair), written whole or not at all.

A sweep writes `run.json` (what was asked: model, sites, direction, dtype) and `shards/*.parquet`.
A rerun with the same settings skips every pair that has its shard, so a killed sweep loses at
most the pair in flight; a rerun with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from notice.errors import NoticeError
from notice.io import atomic_path

MANIFEST = "run.json"


class ResultStore:
    """A folder of per-pair result shards for one sweep."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]):
        self.folder = Path(folder)
        self.shards = self.folder / "shards"
        path = self.folder / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text())
            if found != manifest:
                changed = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
                raise NoticeError(f"{self.folder} holds results of another sweep ({', '.join(changed)} differ); "
                                  "use a new --out folder or delete this one")
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self.shards.mkdir(parents=True, exist_ok=True)

    def shard(self, pair_id: str) -> Path:
        """A file name that is safe for any pair id and unique to it."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", pair_id)[:60]
        digest = hashlib.sha1(pair_id.encode()).hexdigest()[:10]
        return self.shards / f"{slug}-{digest}.parquet"

    def done(self, pair_id: str) -> bool:
        return self.shard(pair_id).is_file()

    def write(self, pair_id: str, frame: pd.DataFrame) -> Path:
        path = self.shard(pair_id)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        return path


def load_results(folder: str | Path) -> pd.DataFrame:
    """Every finished shard of a sweep as one long table (pandas)."""
    shards = sorted((Path(folder) / "shards").glob("*.parquet"))
    if not shards:
        raise NoticeError(f"no results in {folder}: run `notice patch PAIRS --out {folder}` first")
    return pd.concat([pd.read_parquet(path) for path in shards], ignore_index=True)


def results_xarray(frame: pd.DataFrame, stream: str = "text", component: str = "cross_attn",
                   metric: str = "normalized_effect", direction: str | None = None):
    """One metric of one (stream, component) as an xarray DataArray, sample × layer × head × position.

    head is -1 for the whole component and position -1 for @all; cells a sample lacks are NaN
    (questions of different lengths have different positions)."""
    import xarray as xr

    if direction is None:
        directions = sorted(frame["direction"].unique())
        if len(directions) > 1:
            raise NoticeError(f"the table holds directions {', '.join(directions)}: pick one with direction=")
        direction = directions[0] if directions else "denoise"
    rows = frame[(frame["stream"] == stream) & (frame["component"] == component) & (frame["direction"] == direction)]
    if rows.empty:
        raise NoticeError(f"no rows for {stream} {component} in the table: it has "
                          f"{', '.join(sorted(set(frame['stream'] + '.' + frame['component'])))}")
    if metric not in frame.columns:
        raise NoticeError(f"unknown metric {metric!r}: use ld, normalized_effect, p_correct, delta_p or kl")
    keys = pd.DataFrame({"sample": rows["pair_id"].to_numpy(), "layer": rows["layer"].to_numpy(),
                         "head": rows["head"].fillna(-1).astype(int).to_numpy(),
                         "position": rows["position"].fillna(-1).astype(int).to_numpy(),
                         metric: rows[metric].to_numpy(dtype=np.float64)})
    series = keys.groupby(["sample", "layer", "head", "position"])[metric].mean()  # one row each; mean keeps dtype
    array = xr.DataArray.from_series(series)
    array.attrs.update(stream=stream, component=component, metric=metric, direction=direction)
    return array
