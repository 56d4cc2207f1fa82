"""The results table on disk: one Parquet shard per sample (pair), written whole or not at all.

A sweep writes `run.json` (what was asked: model, sites, direction, dtype; and where it came from:
notice version, the pairs' seed, every pairs file that fed it with its hash) and `shards/*.parquet`,
both with the first finished pair, so a sweep that fails before it leaves nothing behind. A rerun
with the same settings skips every pair that has its shard, so a killed sweep loses at most the pair
in flight; a rerun with other settings, or with pairs made with another seed (the same pair ids,
other partners), is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from notice import __version__
from notice.errors import NoticeError
from notice.io import atomic_path

MANIFEST = "run.json"
RECORDED_ONLY = ("version", "pairs")  # for the record: a newer notice, or more pairs, may join a sweep


def file_record(path: str | Path) -> dict[str, str]:
    """A pairs file as run.json records it: its path and the SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(Path(path).resolve()), "sha256": digest.hexdigest()}


def _differences(found: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Settings whose values disagree; a key one side lacks or leaves empty (older run.json files,
    library calls without provenance) is not held against the other."""
    keys = set(found) & set(manifest) - set(RECORDED_ONLY)
    return sorted(k for k in keys if None not in (found[k], manifest[k]) and found[k] != manifest[k])


def _merged(found: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The sweep's own record, with the pairs files of this run added to those of earlier ones."""
    pairs = list(found.get("pairs") or [])
    pairs += [record for record in manifest.get("pairs") or [] if record not in pairs]
    return {**manifest, **found, "pairs": pairs}


class ResultStore:
    """A folder of per-pair result shards for one sweep."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]):
        self.folder = Path(folder)
        self.shards = self.folder / "shards"
        self.manifest = {"version": __version__, **manifest}
        if self.folder.exists() and not self.folder.is_dir():
            raise NoticeError(f"results folder {self.folder} is a file: give a folder path")
        path = self.folder / MANIFEST
        self.started = path.is_file()
        self.unrecorded = True  # run.json to (re)write with the next shard
        if self.started:
            found = json.loads(path.read_text())
            changed = _differences(found, self.manifest)
            if changed:
                raise NoticeError(f"{self.folder} holds results of another sweep ({', '.join(changed)} differ); "
                                  "use a new --out folder or delete this one")
            self.manifest = _merged(found, self.manifest)
            self.unrecorded = self.manifest != found

    def shard(self, pair_id: str) -> Path:
        return self.shards / shard_name(pair_id)

    def done(self, pair_id: str) -> bool:
        return self.shard(pair_id).is_file()

    def write(self, pair_id: str, frame: pd.DataFrame) -> Path:
        if self.unrecorded:  # the first finished pair starts the folder, or adds its pairs file to the record
            self.shards.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / MANIFEST) as tmp:
                tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
            self.started, self.unrecorded = True, False
        path = self.shard(pair_id)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        return path


def shard_name(pair_id: str) -> str:
    """A file name that is safe for any pair id and unique to it."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", pair_id)[:60]
    digest = hashlib.sha1(pair_id.encode()).hexdigest()[:10]
    return f"{slug}-{digest}.parquet"


def count_done(folder: str | Path, pair_ids: Iterable[str]) -> int:
    """How many of these pairs have their shard in a results folder (finished by any run)."""
    shards = Path(folder) / "shards"
    return sum((shards / shard_name(pair_id)).is_file() for pair_id in pair_ids)


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
