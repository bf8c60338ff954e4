"""Where the model looks and where its output may land.

1. :func:`validate_box` checks the caller's box against the background.
2. :func:`plan_window` picks a square context window around the box (as ObjectStitch crops around the object: the model sees
   a window around the object, not the whole background) and its scale to the model's size.
3. :func:`crop_window` cuts that window out (edge-padding where it leaves the background) and
   resizes it to the model's size; :func:`model_hole` is the model-space mask, aligned to the
   latent grid so every latent cell that touches the editable region is regenerated.
4. :func:`paste_back` resizes only the editable region of the generated window back to background
   pixels and blends it in with a soft edge that lies *inside* the region.

The guarantee: :func:`paste_back` writes only pixels inside the region's box where the blend weight
is positive, so every other pixel of the background is returned bit-identical.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from PIL import Image

from composekit.errors import InputError

__all__ = [
    "Box",
    "Window",
    "validate_box",
    "mask_to_box",
    "plan_window",
    "crop_window",
    "model_hole",
    "feather_alpha",
    "paste_back",
    "box_blur",
    "dilate",
    "silhouette_region",
]

Box = tuple[int, int, int, int]
# A context window may be edge-padded past a narrow background; it is refused when its pixel count
# exceeds 4x the background's and this (a 4096 x 4096 window), so a thin strip cannot ask for gigabytes.
MAX_PADDED_WINDOW = 4096 * 4096
_RESAMPLE = Image.Resampling.LANCZOS


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` (the CLI's, the HTTP form's and batch rows' box text) as four ints, or InputError.
    Range checks against a background are :func:`validate_box`'s."""
    parts = text.split(",") if isinstance(text, str) and len(text) <= 200 else []
    if len(parts) != 4 or not all(re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", p) for p in parts):
        shown = repr(text) if not isinstance(text, str) or len(text) <= 60 else repr(text[:40]) + f"... ({len(text)} chars)"
        raise InputError(f"box must be four integers 'x0,y0,x1,y1' (x1, y1 exclusive), got {shown}")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return x0, y0, x1, y1


def validate_box(box, width: int, height: int) -> Box:
    """Return ``box`` as four ints ``(x0, y0, x1, y1)`` or raise :class:`InputError`.

    Coordinates are background pixels, ``x1``/``y1`` exclusive, and must satisfy
    ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``. Boxes outside the background are refused
    rather than clipped, so a caller's off-by-some error never silently moves the object.
    """
    try:
        values = list(box)
    except TypeError:
        raise InputError(f"box must be a sequence (x0, y0, x1, y1), got {type(box).__name__}") from None
    if len(values) != 4:
        raise InputError(f"box must have 4 numbers (x0, y0, x1, y1), got {len(values)}: {box!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (Real, np.integer, np.floating)):
            raise InputError(f"box values must be numbers, got {v!r} ({type(v).__name__}) in {box!r}")
        if isinstance(v, (Integral, np.integer)):
            out.append(int(v))  # exact, whatever its size (compared with the background below)
            continue
        try:
            f = float(v)
        except (OverflowError, ValueError):
            raise InputError(f"box value {v!r} is out of range; expected pixel coordinates") from None
        if not math.isfinite(f):
            raise InputError(f"box values must be finite, got {box!r}")
        if f != int(f):
            raise InputError(
                f"box values must be whole pixels, got {v!r} in {box!r}; round them, e.g. with round()"
            )
        out.append(int(f))
    x0, y0, x1, y1 = out
    if x1 <= x0 or y1 <= y0:
        raise InputError(
            f"box {tuple(out)} is empty or inverted: expected x0 < x1 and y0 < y1 (x1, y1 exclusive)"
            f"{_xywh_hint(out, width, height)}"
        )
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(
            f"box {tuple(out)} lies outside the {width}x{height} background: expected 0 <= x0 < x1 <= {width} "
            f"and 0 <= y0 < y1 <= {height}{_xywh_hint(out, width, height) or _clip_hint(out, width, height)}"
        )
    return x0, y0, x1, y1


def _xywh_hint(box: list[int], width: int, height: int) -> str:
    """A hint when the box reads as (x, y, width, height), a common other convention, and then fits."""
    x, y, w, h = box
    if x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height:
        return (f"; if these are (x, y, width, height), the box is ({x}, {y}, {x + w}, {y + h}): composekit's "
                "boxes are corners (x0, y0, x1, y1)")
    return ""


def _clip_hint(box: list[int], width: int, height: int) -> str:
    """"; clip it, e.g. (...)" when clipping leaves a non-empty box, else advice to move it."""
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if x0 < x1 and y0 < y1:
        return f"; clip it, e.g. ({x0}, {y0}, {x1}, {y1})"
    return "; the box does not overlap the background at all: move it inside"


def mask_to_box(mask: np.ndarray) -> Box:
    """Tight bounding box ``(x0, y0, x1, y1)`` of a boolean mask; :class:`InputError` if it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise InputError("mask selects no pixel: expected at least one pixel >= 0.5 (white) in the mask")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Window:
    """A square window of the background, ``side`` pixels, whose top-left is ``(x, y)``.

    ``x``/``y`` may be negative and the window may extend past the background where the background
    is smaller than the window in one dimension; those pixels are edge-padded context that is
    never pasted back. ``model_size`` is the side the model generates at.
    """

    x: int
    y: int
    side: int
    model_size: int

    @property
    def scale(self) -> float:
        """Model pixels per background pixel."""
        return self.model_size / self.side

    @property
    def identity(self) -> bool:
        """True when the window maps 1:1 onto model pixels (no resize happens)."""
        return self.side == self.model_size

    def to_model(self, box: Box) -> tuple[float, float, float, float]:
        """``box`` (background pixels) in model-space pixels, as floats."""
        s = self.scale
        x0, y0, x1, y1 = box
        return ((x0 - self.x) * s, (y0 - self.y) * s, (x1 - self.x) * s, (y1 - self.y) * s)


def _place(center: float, side: int, extent: int) -> int:
    """Start of a ``side``-long span centred on ``center``, kept inside ``[0, extent)`` where it fits;
    where it does not fit it covers the whole extent."""
    start = int(round(center - side / 2))
    lo, hi = min(0, extent - side), max(0, extent - side)
    return min(max(start, lo), hi)


def plan_window(box: Box, width: int, height: int, model_size: int, context: float = 2.0) -> Window:
    """Choose the square context window the model will see.

    The side is ``context`` times the box's longer side, at least the box, at most the background's
    longer side. A background that already is ``model_size`` square is used whole, with no resize.
    """
    if not (isinstance(context, Real) and math.isfinite(context) and context >= 1.0):
        raise InputError(f"context must be a finite number >= 1.0 (window side / box side), got {context!r}")
    if width == height == model_size:
        return Window(0, 0, model_size, model_size)
    x0, y0, x1, y1 = box
    longest = max(x1 - x0, y1 - y0)
    side = int(math.ceil(longest * float(context)))
    side = max(longest, min(side, max(width, height)))
    limit = max(4 * width * height, MAX_PADDED_WINDOW)
    if side * side > limit:
        raise InputError(
            f"the context window for box {box} on this {width}x{height} background would be {side}x{side} pixels "
            f"(edge-padded), over the limit of {limit:,} pixels for so narrow a background; use a background "
            "closer to square, a smaller box or a smaller context"
        )
    x = _place((x0 + x1) / 2, side, width)
    y = _place((y0 + y1) / 2, side, height)
    return Window(x, y, side, model_size)


def crop_window(image: np.ndarray, window: Window) -> np.ndarray:
    """The window's pixels at model size, ``(M, M, C)`` uint8. The input is not modified."""
    h, w = image.shape[:2]
    x, y, s = window.x, window.y, window.side
    inside = image[max(y, 0) : min(y + s, h), max(x, 0) : min(x + s, w)]
    pad = ((max(-y, 0), max(y + s - h, 0)), (max(-x, 0), max(x + s - w, 0))) + ((0, 0),) * (image.ndim - 2)
    crop = np.pad(inside, pad, mode="edge") if any(p for pair in pad for p in pair) else inside
    if window.identity:
        return np.ascontiguousarray(crop)
    m = window.model_size
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((m, m), _RESAMPLE))


def model_hole(
    box: Box, window: Window, grid: int, region: np.ndarray | None = None
) -> np.ndarray:
    """Model-space hole mask ``(M, M)`` float32, 1 = regenerate, aligned to ``grid``-pixel cells.

    A cell is a hole when any pixel of the editable region falls in it: the box, or where given the
    boolean ``region`` mask cropped to the box. Aligning to the VAE's latent grid means
    nearest-neighbour downsampling gives exactly the latent mask.
    """
    m = window.model_size
    if m % grid:
        raise InputError(f"model size {m} is not a multiple of the latent grid {grid}")
    cells = m // grid
    x0, y0, x1, y1 = box
    # Background-pixel edges of every cell, as floats: cell i covers [edge[i], edge[i+1]).
    xe = window.x + np.arange(cells + 1) * grid / window.scale
    ye = window.y + np.arange(cells + 1) * grid / window.scale
    cx = (xe[1:] > x0) & (xe[:-1] < x1)
    cy = (ye[1:] > y0) & (ye[:-1] < y1)
    hole = np.outer(cy, cx)
    if region is not None:
        for i, j in zip(*np.nonzero(hole)):
            ya, yb = max(int(math.floor(ye[i])), y0), min(int(math.ceil(ye[i + 1])), y1)
            xa, xb = max(int(math.floor(xe[j])), x0), min(int(math.ceil(xe[j + 1])), x1)
            hole[i, j] = bool(region[ya - y0 : yb - y0, xa - x0 : xb - x0].any())
    return np.kron(hole.astype(np.float32), np.ones((grid, grid), np.float32))


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2r+1)^2`` square, zero outside the array (separable, via cumulative sums).

    Memory is a few copies of ``a`` whatever the radius: window sums are read from the cumulative
    sum at clamped indices instead of padding the array by ``radius``.
    """
    k = 2 * radius + 1
    out = a.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        c = np.cumsum(out, axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        i = np.arange(n)
        hi, lo = np.minimum(i + radius + 1, n), np.maximum(i - radius, 0)
        out = (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / k
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in every direction (a square structuring element)."""
    mask = mask.astype(bool)
    if radius <= 0:
        return mask.copy()
    k = 2 * radius + 1
    return box_blur(mask.astype(np.float32), radius) > 0.5 / (k * k)


def silhouette_region(alpha: np.ndarray | None, box: Box, margin: int) -> np.ndarray | None:
    """The editable region for ``region="silhouette"``: the object's alpha placed in the box, dilated.

    The object's visible pixels (alpha > 0), tightened to their bounding box, are resized to fill the
    box (as the model fills the hole), then grown by ``margin`` pixels and clipped to the box. Returns a
    box-shaped bool mask, or None (the whole box) for an object without alpha or a fully opaque one.
    """
    if alpha is None or bool((alpha == 255).all()):
        return None
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(alpha > 0)
    tight = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    placed = np.asarray(Image.fromarray(tight).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)) > 0
    region = dilate(placed, margin)
    if not region.any():  # a sliver that vanished in the resize: keep the box rather than nothing
        return None
    return region


def default_margin(box: Box) -> int:
    """Silhouette margin used when the caller gives none: 1/8 of the box's shorter side, at least 2 px."""
    x0, y0, x1, y1 = box
    return max(2, int(round(min(x1 - x0, y1 - y0) / 8)))


def feather_alpha(region: np.ndarray, radius: int) -> np.ndarray:
    """Blend weight in ``[0, 1]`` that is 0 outside ``region`` and ramps to 1 inside it.

    The ramp is ``radius`` pixels wide and lies entirely inside the region, so pixels outside the
    region get weight exactly 0.
    """
    region = region.astype(bool)
    if radius <= 0:
        return region.astype(np.float32)
    blurred = box_blur(region.astype(np.float32), radius)
    alpha = np.clip(2.0 * blurred - 1.0 + 1.0 / (2 * radius + 1), 0.0, 1.0)
    return np.where(region, alpha, 0.0).astype(np.float32)


def default_feather(box: Box) -> int:
    """Feather radius used when the caller gives none: 1/16 of the box's shorter side."""
    x0, y0, x1, y1 = box
    return int(round(min(x1 - x0, y1 - y0) / 16))


def paste_back(
    background: np.ndarray,
    generated: np.ndarray,
    window: Window,
    box: Box,
    alpha: np.ndarray,
) -> np.ndarray:
    """A copy of ``background`` with ``generated`` (the model-size window) blended into ``box``.

    ``alpha`` has the box's shape; only pixels with ``alpha > 0`` are written. The channels of
    ``generated`` replace the first channels of ``background`` (an alpha channel of an RGBA
    background is left as it was).
    """
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if window.identity:
        gx, gy = x0 - window.x, y0 - window.y
        region = generated[gy : gy + bh, gx : gx + bw].astype(np.float32)
    else:
        src = tuple(float(v) for v in window.to_model(box))
        region = np.asarray(
            Image.fromarray(generated).resize((bw, bh), _RESAMPLE, box=src), dtype=np.float32
        )
    out = background.copy()
    target = out[y0:y1, x0:x1]
    c = region.shape[2]
    a = alpha[..., None]
    blended = np.rint(target[..., :c].astype(np.float32) * (1.0 - a) + region * a)
    blended = np.clip(blended, 0, 255).astype(background.dtype)
    write = alpha > 0
    target[..., :c][write] = blended[write]
    return out
