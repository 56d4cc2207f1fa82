"""The Pair record: one clean input, one corrupted input, and the two answers that tell them apart.

Every task emits Pairs; selection filters them; patching reads them. On disk a set of pairs
is one Parquet file readable with pandas; image paths are stored relative to that file's
folder (derived images are PNG files beside it), metadata as a JSON string column.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from notice.errors import NoticeError
from notice.io import atomic_path

# text_str swaps the right option for a contrast word; text_str_both swaps both options (the
# NOTICE paper's form); text_str_yesno swaps the colour or shape a yes/no question names ("is a red
# shape present?" about the clean image). They are separate corruptions so that no count or ranking pools them.
CORRUPTIONS = ("image_smp", "text_str", "image_noise", "text_noise", "text_str_both", "text_str_yesno")
DEFAULT_CORRUPTIONS = CORRUPTIONS[:4]  # what `notice pairs` makes unless asked
STR_FORMS = {"one": "text_str", "both": "text_str_both"}
# metadata entries that are file paths (object masks): stored relative like the images
PATH_METADATA = ("clean_mask", "corrupt_mask")


def modality_of(corruption: str) -> str:
    """The modality a corruption changes: image_* corrupt the image, the rest the text."""
    return "image" if corruption.startswith("image") else "text"


@dataclass(frozen=True)
class Pair:
    id: str
    task: str
    corruption: str  # one of CORRUPTIONS
    clean_image: str
    corrupt_image: str  # the clean image again for text corruptions and noise
    clean_prompt: str
    corrupt_prompt: str  # the clean prompt again for image corruptions and noise
    correct: str  # the right answer for the clean input
    incorrect: str  # the contrasting answer (right for the corrupted input where one exists)
    metadata: dict[str, Any] = field(default_factory=dict)  # svo role, state category, emotion, mask, ...

    @property
    def modality(self) -> str:
        return modality_of(self.corruption)

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"pair {self.id}: unknown corruption {self.corruption!r}; use one of {CORRUPTIONS}")


COLUMNS = [f.name for f in fields(Pair)]


PROVENANCE_KEY = b"notice"  # Parquet schema metadata: what made the file (version, task, seed, model, ...)


def write_pairs(pairs: Iterable[Pair], path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write pairs as Parquet (whole file or nothing); image paths become relative to its folder.
    `provenance` (JSON-able) is stored in the file's metadata; `pairs_provenance` reads it back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    root = path.parent.resolve()
    rows = []
    for pair in pairs:
        row = asdict(pair)
        for key in ("clean_image", "corrupt_image"):
            row[key] = _relative(Path(row[key]), root)
        row["metadata"] = dict(row["metadata"])
        for key in PATH_METADATA:
            if key in row["metadata"]:
                row["metadata"][key] = _relative(Path(row["metadata"][key]), root)
        row["metadata"] = json.dumps(row["metadata"], sort_keys=True)
        rows.append(row)
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=COLUMNS), preserve_index=False)
    if provenance:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def pairs_provenance(path: str | Path) -> dict[str, Any]:
    """What made a pairs file, as `notice pairs` and `notice select` record it ({} when unknown)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def read_pairs(path: str | Path, check_files: bool = True) -> list[Pair]:
    """Pairs from a Parquet file written by `write_pairs`; image paths resolved against its folder.

    Every row is checked before any is returned: a bad value or (with `check_files`) a missing image
    or mask is one line naming the file, the row and the pair id."""
    path = Path(path)
    if not path.is_file():
        raise NoticeError(f"pairs file not found: {path} (make one with `notice pairs`)")
    try:
        frame = pd.read_parquet(path)
    except Exception as error:
        raise NoticeError(f"cannot read pairs file {path}: {error.__class__.__name__}; "
                          "it must be Parquet written by `notice pairs`") from error
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise NoticeError(f"pairs file {path} lacks column(s) {', '.join(missing)}; rebuild it with `notice pairs`")
    if frame.empty:
        raise NoticeError(f"pairs file {path} holds no pairs; make it again with `notice pairs` or `notice select`")
    root = path.parent.resolve()
    pairs = []
    for number, row in enumerate(frame[COLUMNS].to_dict("records"), start=1):
        where = f"pairs file {path} row {number} of {len(frame)} (pair {row['id']!r})"
        pairs.append(_pair_from_row(row, root, where, check_files))
    return pairs


def _pair_from_row(row: dict[str, Any], root: Path, where: str, check_files: bool) -> Pair:
    for key in COLUMNS:
        if key != "metadata" and (not isinstance(row[key], str) or not row[key]):
            raise NoticeError(f"{where}: {key} is {row[key]!r}, not a text; rebuild the file with `notice pairs`")
    if row["corruption"] not in CORRUPTIONS:
        raise NoticeError(f"{where}: unknown corruption {row['corruption']!r}; use one of {', '.join(CORRUPTIONS)}")
    try:
        row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else {}
    except (TypeError, ValueError) as error:
        raise NoticeError(f"{where}: metadata is not JSON ({error.__class__.__name__})") from error
    files = {key: row for key in ("clean_image", "corrupt_image")}
    files.update({key: row["metadata"] for key in PATH_METADATA if key in row["metadata"]})
    for key, holder in files.items():
        holder[key] = str(root / holder[key]) if not Path(holder[key]).is_absolute() else holder[key]
        if check_files and not Path(holder[key]).is_file():
            raise NoticeError(f"{where}: {key} not found: {holder[key]}; restore it or make the pairs again")
    return Pair(**row)


def _relative(image: Path, root: Path) -> str:
    image = image.resolve()
    try:
        return str(image.relative_to(root))
    except ValueError:
        return str(image)
