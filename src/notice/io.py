"""File input and output at the boundary: images in, whole files out (never half-written)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from notice.errors import NoticeError


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise NoticeError(f"image not found: {path} (check the path)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise NoticeError(f"cannot read image {path}: {error.__class__.__name__}; use a PNG or JPEG file") from error


@contextmanager
def no_new_empty_folders(path: str | Path) -> Iterator[None]:
    """On error, remove the folders at and above `path` that did not exist before and are empty."""
    new, folder = [], Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        new.append(folder)  # deepest first
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()
            except OSError:  # holds something (finished work) or was never made
                if folder.exists():
                    break
        raise


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only on success."""
    target = Path(target)
    with no_new_empty_folders(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success move every file written there into `target`
    (made if missing; other files in it are kept), so an error leaves `target` as it was."""
    target = Path(target)
    stage = target.parent / f".{target.name}.part"
    with no_new_empty_folders(target.parent):
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            yield stage
            for path in sorted(stage.rglob("*")):
                if path.is_file():
                    final = target / path.relative_to(stage)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def save_mask(alpha: np.ndarray, path: str | Path) -> Path:
    """Write a coverage map as an 8-bit greyscale PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(alpha * 255), 0, 255).astype(np.uint8), mode="L").save(path)
    return path


def load_mask(path: str | Path) -> np.ndarray:
    """A mask PNG as coverage in [0, 1], [H, W] float."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
