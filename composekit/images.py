"""Turning the caller's images into arrays, and the result back into the caller's kind.

Accepted: a PIL image, a numpy array (``HxW``, ``HxWx3`` or ``HxWx4`` uint8), a path
(``str``/``os.PathLike``) or encoded ``bytes``. Files and bytes are decoded with Pillow, only in the
allowed formats, with EXIF orientation applied and the first frame of animations taken. PIL images
and arrays are taken as the pixels they are (no EXIF rotation). The caller's objects are never
modified: every conversion copies.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

__all__ = ["ALLOWED_FORMATS", "Picture", "load_picture", "to_caller_kind"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
Kind = Literal["pil", "numpy", "path", "bytes"]


@dataclass(frozen=True)
class Picture:
    """An input image as composekit works on it.

    ``rgb`` is ``HxWx3`` uint8; ``alpha`` is ``HxW`` uint8 or None; ``mode`` is the mode the result
    is returned in (``"RGB"``, ``"RGBA"`` or ``"L"``); ``kind`` is how the caller passed it.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    mode: str
    kind: Kind

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _open(data: Any, what: str) -> Image.Image:
    """Decode a path or bytes with Pillow, refusing formats outside :data:`ALLOWED_FORMATS`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        stream, label = io.BytesIO(bytes(data)), f"{what} bytes"
    else:
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise InputError(f"{what} file not found: {path!r}; pass an existing image file, PIL image or array")
        stream, label = open(path, "rb"), f"{what} file {path!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream, formats=list(ALLOWED_FORMATS))
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{label} is too large to decode safely ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"{label} is not a readable image in an allowed format {ALLOWED_FORMATS}: {exc}"
        ) from None
    finally:
        stream.close()
    return img


def _from_array(arr: np.ndarray, what: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise InputError(
            f"{what} array has dtype {arr.dtype}; expected uint8 (0..255). Convert it, e.g. "
            "(np.clip(a, 0, 1) * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[2] == 3 else "RGBA")
    raise InputError(f"{what} array has shape {arr.shape}; expected HxW, HxWx3 (RGB) or HxWx4 (RGBA)")


def load_picture(image: Any, what: str = "image") -> Picture:
    """Read ``image`` (PIL, numpy, path or bytes) into a :class:`Picture` (always a fresh copy)."""
    if isinstance(image, Image.Image):
        kind: Kind = "pil"
        img = image
    elif isinstance(image, np.ndarray):
        kind = "numpy"
        img = _from_array(image, what)
    elif isinstance(image, (str, os.PathLike)):
        kind = "path"
        img = _open(image, what)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        kind = "bytes"
        img = _open(image, what)
    else:
        raise InputError(
            f"{what} must be a PIL image, numpy array, path or bytes, got {type(image).__name__}"
        )
    if img.width < 1 or img.height < 1:
        raise InputError(f"{what} is empty ({img.width}x{img.height})")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        arr = np.array(img, dtype=np.uint8)
        return Picture(arr[..., :3].copy(), arr[..., 3].copy(), "RGBA", kind)
    if img.mode == "L":
        return Picture(np.array(img.convert("RGB"), dtype=np.uint8), None, "L", kind)
    return Picture(np.array(img.convert("RGB"), dtype=np.uint8), None, "RGB", kind)


def to_caller_kind(rgb: np.ndarray, like: Picture) -> Any:
    """The result image in the caller's kind and mode: numpy in -> numpy out, otherwise PIL.

    An RGBA background keeps its alpha channel as it was; an ``L`` background is returned as ``L``.
    """
    if like.mode == "RGBA":
        arr = np.dstack([rgb, like.alpha])
    elif like.mode == "L":
        arr = np.asarray(Image.fromarray(rgb).convert("L"))
    else:
        arr = rgb
    if like.kind == "numpy":
        return np.ascontiguousarray(arr)
    return Image.fromarray(np.ascontiguousarray(arr))
