"""Atomic writes: a temporary file (or folder) beside the target, then a rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from composekit.errors import InputError, OutputError

__all__ = ["IMAGE_FORMATS", "atomic_file", "save_image_atomic", "atomic_directory", "check_output_path"]

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, before_replace: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``path``; on success it replaces ``path`` in one rename.

    On any failure the temporary file is removed and ``path`` keeps its old content (or stays absent).
    ``before_replace`` runs once the file is complete, just before the rename (a batch journals its row
    there, so that an output that exists always has its record).
    """
    out = Path(path)
    if out.is_dir():
        raise InputError(f"cannot write {out}: it is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}; choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"cannot write {out}: no space left on its device ({errno.errorcode[exc.errno]}); nothing was "
                              "written. Free some space or choose another location") from None
        raise


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an image output path that cannot be written, before any work is done: a folder, an unknown
    extension, or a location whose nearest existing folder is not a writable folder."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"cannot write {out}: it is a folder; give a file name such as {out / 'out.png'}")
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise InputError(f"output {out} has an unknown extension; use one of {sorted(IMAGE_FORMATS)}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "not a folder" if not parent.is_dir() else "not writable"
        raise InputError(f"cannot write {out}: {parent} is {what}; choose a writable location")
    return out


def save_image_atomic(image, path: str | os.PathLike, before_replace: Callable[[], None] | None = None) -> Path:
    """Save a PIL image so that ``path`` holds either its old content or the whole new image
    (``before_replace``: see :func:`atomic_file`)."""
    out = check_output_path(path)
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"output {out} has an unknown extension; use one of {sorted(IMAGE_FORMATS)}")
    with atomic_file(out, before_replace) as f:
        image.save(f, format=fmt)
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any failure the temporary folder is removed and ``out_dir`` is left as it was, so a failed
    write never leaves a half-written directory that would load.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another directory or pass overwrite=True")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}; choose a writable location") from None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
