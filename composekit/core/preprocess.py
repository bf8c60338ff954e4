"""The object image as the image encoder wants it (CLIP's resize, centre crop and normalisation).

Values come from the model's ``feature_extractor/preprocessor_config.json``, so the tensor equals
what the model's own ``CLIPImageProcessor`` produces (tested against transformers).

Cut-outs: an object with an alpha channel is first tightened to the bounding box of its visible
pixels (alpha > 0), composited over the backdrop with its (straight) alpha, and padded with it to a
square, so that CLIP's centre crop cannot cut part of the object off and the transparent area reads
as a plain backdrop (white, or the colour the model's ``model_index.json`` names in
``cutout_backdrop``: black for ObjectStitch, as BCMI's inference blacks out non-object pixels). Opaque RGB objects go
through the feature extractor's steps unchanged, exactly as the reference pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from composekit.errors import InputError, ModelError

__all__ = ["ClipPreprocessor", "flatten_cutout", "require_visible", "check_object_shape", "MAX_OBJECT_ASPECT"]

# The object is resized so its shorter side is CLIP's (224) and, as a cut-out, padded to a square: a
# 1 x 40000 object would become gigabytes. Longer/shorter side beyond this is refused.
MAX_OBJECT_ASPECT = 50

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _side(value: Any, key: str) -> int:
    """A square size from the formats transformers writes: int, {"shortest_edge"}, {"height","width"}."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return int(value["height"])
    raise ModelError(f"feature_extractor {key}={value!r} is not supported; expected a square size")


@dataclass(frozen=True)
class ClipPreprocessor:
    """CLIP image preprocessing: shortest edge to ``size`` (bicubic), centre crop ``crop``, scale, normalise."""

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = _CLIP_MEAN
    std: tuple[float, float, float] = _CLIP_STD
    rescale: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ClipPreprocessor":
        for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
            if config.get(flag) is False:
                raise ModelError(f"feature_extractor {flag}=false is not supported by composekit")
        size = _side(config.get("size", 224), "size")
        crop = _side(config.get("crop_size", size), "crop_size")
        return cls(
            size=size,
            crop=crop,
            mean=tuple(config.get("image_mean", _CLIP_MEAN)),
            std=tuple(config.get("image_std", _CLIP_STD)),
            rescale=float(config.get("rescale_factor", 1 / 255)),
            resample=int(config.get("resample", int(Image.Resampling.BICUBIC))),
        )

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``HxWx3`` uint8 -> ``1x3xCxC`` float32 pixel values."""
        h, w = rgb.shape[:2]
        check_object_shape(h, w)
        if h <= w:
            nh, nw = self.size, int(self.size * w / h)
        else:
            nh, nw = int(self.size * h / w), self.size
        img = Image.fromarray(rgb).resize((nw, nh), Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.float32)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        if top < 0 or left < 0:
            arr = np.pad(arr, ((max(-top, 0),) * 2, (max(-left, 0),) * 2, (0, 0)))
            top, left = max(top, 0), max(left, 0)
        arr = arr[top : top + self.crop, left : left + self.crop]
        arr = arr * np.float32(self.rescale)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


def check_object_shape(height: int, width: int, what: str = "object") -> None:
    """Refuse an object (or its visible part) more elongated than :data:`MAX_OBJECT_ASPECT` : 1."""
    ratio = max(height, width) / max(min(height, width), 1)
    if ratio > MAX_OBJECT_ASPECT:
        raise InputError(
            f"{what} is {width}x{height} pixels, {ratio:.0f}:1; the model's image encoder takes objects up to "
            f"{MAX_OBJECT_ASPECT}:1. Crop it closer to the object or pad it towards a square"
        )


def require_visible(alpha: np.ndarray | None) -> None:
    """Refuse a cut-out with no visible pixel (alpha 0 everywhere)."""
    if alpha is not None and not alpha.any():
        raise InputError(
            "object image is fully transparent (alpha is 0 everywhere); pass a cut-out with visible pixels"
        )


def flatten_cutout(rgb: np.ndarray, alpha: np.ndarray | None,
                   backdrop: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """An RGB object image: cut-outs tightened, composited over ``backdrop`` and padded square.

    The backdrop is white for Paint by Example and black for ObjectStitch models (BCMI's inference
    blacks out non-object pixels); a model's ``model_index.json`` may set ``cutout_backdrop``.
    """
    if alpha is None:
        return rgb
    require_visible(alpha)
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    check_object_shape(int(y1 - y0), int(x1 - x0), "the object's visible part (alpha > 0)")
    a = alpha[y0:y1, x0:x1, None].astype(np.float32) / 255.0
    back = np.asarray(backdrop, np.float32)
    obj = rgb[y0:y1, x0:x1].astype(np.float32) * a + back * (1.0 - a)
    obj = np.rint(obj).astype(np.uint8)
    h, w = obj.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(backdrop, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = obj
    return out
