"""Turning the caller's images into arrays, and the result back into the caller's kind.

Accepted: a PIL image, a numpy array (``HxW``, ``HxWx3`` or ``HxWx4``), a path
(``str``/``os.PathLike``) or encoded ``bytes``. The caller's objects are never modified: every
conversion copies.

Rules, the same for every input:

- Files and bytes are decoded with Pillow only in :data:`ALLOWED_FORMATS` (detected from the
  content, whatever the file name says), with EXIF orientation applied and the first frame of an
  animation taken. Their pixel count is checked against :data:`MAX_PIXELS` from the header, before
  any pixel is decoded (change it with :func:`set_max_pixels`). PIL images and arrays are taken as
  the pixels they are (no EXIF rotation, no pixel limit: they are decoded already).
- Modes: ``RGB`` as is; ``RGBA``, ``LA``, ``PA`` and ``P`` with transparency keep their alpha
  (straight alpha); ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted to RGB by Pillow;
  16-bit images (``I;16*``, ``I``) are scaled from 0..65535 to 0..255 and float images (``F``) from
  0..1 to 0..255 — scaled, not clipped at 255; float values outside 0..1 are an error.
- Arrays: ``uint8`` as is, ``uint16`` scaled like 16-bit images, ``float16/32/64`` in 0..1 scaled to
  0..255; ``bool`` only as a mask; any other dtype is an error.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from composekit.core.options import check_integer
from composekit.errors import InputError

__all__ = ["ALLOWED_FORMATS", "MAX_PIXELS", "Picture", "image_size", "load_picture", "to_caller_kind", "set_max_pixels"]

from composekit.formats.atomic import IMAGE_FORMATS

ALLOWED_FORMATS = tuple(dict.fromkeys(IMAGE_FORMATS.values()))  # ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
# Decoded images larger than this are refused (see set_max_pixels). The default is Pillow's own
# decompression-bomb threshold, 89,478,485 pixels (e.g. 9459 x 9459); Pillow additionally refuses
# anything over twice its PIL.Image.MAX_IMAGE_PIXELS, so raise that too for larger images.
MAX_PIXELS = 89_478_485


def set_max_pixels(limit: int) -> None:
    """Set the largest pixel count (width x height) composekit decodes from a file or bytes."""
    global MAX_PIXELS
    MAX_PIXELS = check_integer("the pixel limit", limit, 1)
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
        if os.path.isdir(path):
            raise InputError(f"{what} {path!r} is a folder; pass an image file")
        if not os.path.isfile(path):
            raise InputError(f"{what} file not found: {path!r}; pass an existing image file, PIL image or array")
        stream, label = open(path, "rb"), f"{what} file {path!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # composekit's own limit governs
            img = Image.open(stream, formats=list(ALLOWED_FORMATS))  # reads the header only
            if img.width * img.height > MAX_PIXELS:
                raise InputError(
                    f"{label} is {img.width}x{img.height} = {img.width * img.height:,} pixels, over the limit of "
                    f"{MAX_PIXELS:,}; refused before decoding. If you trust it, raise the limit with "
                    "composekit.formats.images.set_max_pixels(N)"
                )
            img.seek(0)
            img.load()  # decode first: a truncated file is reported as such, not as bad EXIF
            img = _exif_transpose(img, label)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{label} is over the limit Pillow allows ({exc}); refused before decoding. If you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS and composekit.formats.images.set_max_pixels(N)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = re.sub(r" <[\w.]+ object at 0x[0-9a-f]+>", "", str(exc))  # no memory addresses in messages
        if "truncated" in reason:
            raise InputError(f"{label} is not a readable image: it is truncated (the file ends before its image "
                             f"data does: {reason}); re-save or re-download it") from None
        raise InputError(
            f"{label} is not a readable image in an allowed format {ALLOWED_FORMATS}: {reason}"
        ) from None
    finally:
        stream.close()
    return img


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes, read from the header alone (nothing is decoded): what
    decoding them would cost, known before paying it. InputError when they are not an allowed image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data)), formats=list(ALLOWED_FORMATS)) as img:
                return int(img.width), int(img.height)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} bytes are over the limit Pillow allows ({exc}); refused before decoding") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = re.sub(r" <[\w.]+ object at 0x[0-9a-f]+>", "", str(exc))
        raise InputError(f"{what} bytes is not a readable image in an allowed format {ALLOWED_FORMATS}: "
                         f"{reason}") from None


def _exif_transpose(img: Image.Image, label: str) -> Image.Image:
    """Apply the EXIF orientation; a file whose EXIF block is malformed is refused with a fix."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # struct.error, TypeError, ... from Pillow's EXIF (re)writer
        raise InputError(
            f"{label} has malformed EXIF metadata ({type(exc).__name__}: {exc}), so its orientation cannot be "
            "applied safely; re-save the image without EXIF (e.g. PIL: img.save(path, exif=b''))"
        ) from None


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Scale 16-bit (0..65535) and float (0..1) pixel values to uint8; refuse anything else."""
    if arr.size == 0:
        raise InputError(f"{what} is empty (shape {arr.shape}); expected at least one pixel")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    if arr.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise InputError(f"{what} has NaN or inf pixel values; expected finite floats in 0..1")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{what} has float pixel values in [{lo:g}, {hi:g}]; expected 0..1. Scale it, or pass uint8 0..255"
            )
        return np.rint(arr.astype(np.float32) * 255.0).astype(np.uint8)
    raise InputError(
        f"{what} has dtype {arr.dtype}; expected uint8 (0..255), uint16 (0..65535) or float (0..1)"
    )


def _from_array(arr: np.ndarray, what: str) -> Image.Image:
    arr = _to_uint8(arr, f"{what} array")
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[2] == 3 else "RGBA")
    raise InputError(f"{what} array has shape {arr.shape}; expected HxW, HxWx3 (RGB) or HxWx4 (RGBA)")


def load_picture(image: Any, what: str = "image") -> Picture:
    """Read ``image`` (PIL, numpy, path, bytes, or a Picture already read) into a :class:`Picture` (always a
    fresh copy)."""
    if isinstance(image, Picture):  # decoded once (e.g. by the HTTP service, to answer 413/415 early)
        return Picture(image.rgb.copy(), None if image.alpha is None else image.alpha.copy(), image.mode, image.kind)
    if isinstance(image, Image.Image):
        kind: Kind = "pil"
        img = image
        try:
            img.load()  # a lazily opened image decodes here; a closed or truncated one fails here
        except Exception as exc:  # ValueError (closed), OSError (truncated), AssertionError (no file)...
            raise InputError(
                f"{what} is a PIL image that cannot be read ({type(exc).__name__}: {exc or 'no data'}); pass an open "
                "image (load it before closing its file) or the file's path"
            ) from None
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 0:
            # Fast path for the common case: one copy, no round trip through Pillow.
            alpha = image[..., 3].copy() if image.shape[2] == 4 else None
            return Picture(np.ascontiguousarray(image[..., :3]).copy() if alpha is not None else image.copy(),
                           alpha, "RGBA" if alpha is not None else "RGB", "numpy")
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
    elif img.mode in ("LA", "PA", "RGBa", "La"):
        if img.mode == "La":  # premultiplied luminance + alpha: Pillow converts it only through LA
            arr = np.asarray(img).astype(np.float32)
            a = arr[..., 1:2]
            straight = np.where(a > 0, np.clip(np.rint(arr[..., :1] * 255.0 / np.maximum(a, 1)), 0, 255), 0)
            img = Image.fromarray(np.dstack([straight, a]).astype(np.uint8), "LA")
        img = img.convert("RGBA")
    elif img.mode.startswith("I"):  # 16-bit (I;16, I;16B, ...) or 32-bit integer images
        arr = np.asarray(img)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise InputError(f"{what} is a {img.mode} image with values outside 0..65535; expected 8- or 16-bit")
        img = Image.fromarray(_to_uint8(arr.astype(np.uint16), what), "L")
    elif img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float32), f"{what} (float image)"), "L")
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
