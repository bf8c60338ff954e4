"""Atomic file writes: a temporary file in the target folder, then a rename over the target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError

__all__ = ["IMAGE_FORMATS", "save_image_atomic"]

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def save_image_atomic(image, path: str | os.PathLike) -> Path:
    """Save a PIL image so that ``path`` holds either its old content or the whole new image."""
    out = Path(path)
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"output {out} has an unknown extension; use one of {sorted(IMAGE_FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
