"""ComfyUI nodes: "Load composekit model" and "composekit Paste".

ComfyUI loads custom nodes from ``ComfyUI/custom_nodes/<pack>/__init__.py``; composekit ships the
nodes in this module and a one-file shim that re-exports them. Write it with::

    python -m composekit.apps.comfyui ComfyUI/custom_nodes        # writes custom_nodes/composekit/__init__.py

(or create that file by hand with the line in :data:`SHIM`). composekit must be installed in ComfyUI's
Python environment (``pip install ".[torch]"`` from a checkout).

- **Load composekit model** (``ComposekitLoadModel``): a model folder, Hub id or ONNX export (empty =
  no model, the weights-free classic method), backend, device and dtype -> a ``COMPOSITOR``. Loaded
  models are cached per process, keyed by those inputs.
- **composekit Paste** (``ComposekitPaste``): a ``COMPOSITOR``, the object ``IMAGE`` (with an optional
  ``MASK`` as LoadImage gives it: 1 where the object is transparent), the background ``IMAGE``, the box
  as four ``INT`` (or a region ``MASK``, 1 = editable), the seed and one widget per paste option
  (generated from the option schema) -> the composite ``IMAGE`` and the edited region as a ``MASK``. A
  batch of backgrounds runs through ``paste_batch``. Progress goes to ComfyUI's progress bar and a
  cancel in ComfyUI stops the sampler between steps, when ``comfy`` is importable.

ComfyUI's IMAGE is float32 ``B x H x W x C`` in 0..1 and MASK ``B x H x W``; images are turned into
uint8 by rounding (exact for images ComfyUI loaded from 8-bit files), so the nodes' output times 255
equals ``Compositor.paste``'s image bit for bit.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from composekit.core.options import SEED, PasteOptions, Spec
from composekit.errors import InputError

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComposekitLoadModel", "ComposekitPaste", "SHIM",
           "install"]

CATEGORY = "composekit"
AUTO = -1  # the INT/FLOAT widget value that stands for an option's automatic value (None in Python)
SHIM = "from composekit.apps.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n"


# -- conversions between ComfyUI's tensors and composekit's arrays -------------------------------------------


def _to_uint8(image: Any, what: str) -> np.ndarray:
    """One ComfyUI IMAGE (``H x W x C`` float in 0..1, or a batch of one) as ``H x W x C`` uint8 (rounded)."""
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise InputError(f"{what} is a batch of {arr.shape[0]} images here; give one")
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"{what} must be a ComfyUI IMAGE (B x H x W x 3 floats in 0..1), got shape {arr.shape}")
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _mask_uint8(mask: Any, index: int, what: str) -> np.ndarray:
    """One ComfyUI MASK (``H x W`` floats in 0..1) of a batch as uint8 (rounded)."""
    arr = mask.detach().cpu().float().numpy() if hasattr(mask, "detach") else np.asarray(mask, np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{what} must be a ComfyUI MASK (B x H x W floats in 0..1), got shape {arr.shape}")
    return np.rint(np.clip(arr[min(index, arr.shape[0] - 1)], 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_image(images: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.stack([np.asarray(i, np.float32)[..., :3] / 255.0 for i in images]).astype(np.float32))


def _to_mask(masks: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.stack(masks).astype(np.float32))


# -- the widgets, from the option schema ---------------------------------------------------------------------


def _widget(spec: Spec) -> tuple[Any, dict[str, Any]]:
    """A ComfyUI input for a declared option: a combo (list of strings), INT or FLOAT (AUTO = automatic)."""
    tooltip = spec.describe() + (f"; {AUTO} = automatic" if spec.nullable else "")
    if spec.choices:
        return list(spec.choices), {"default": spec.default, "tooltip": tooltip}
    if spec.kind is bool:
        return "BOOLEAN", {"default": spec.default, "tooltip": tooltip}
    lo = AUTO if spec.nullable else spec.lo
    default = AUTO if spec.default is None else spec.default
    if spec.kind is int:
        return "INT", {"default": int(default), "min": int(lo), "max": int(spec.hi), "step": 1, "tooltip": tooltip}
    return "FLOAT", {"default": float(default), "min": float(lo), "max": float(spec.hi), "step": 0.01,
                     "tooltip": tooltip}


def _option_specs() -> dict[str, Spec]:
    return {name: spec for name, spec in PasteOptions.specs().items() if spec.cli}


@functools.lru_cache(maxsize=4)
def _load(model: str, backend: str, device: str, dtype: str) -> Any:
    from composekit import Compositor

    if not model.strip():
        return Compositor()
    return Compositor.from_pretrained(model.strip(), backend=backend, device=None if device == "auto" else device,
                                      dtype=None if dtype == "auto" else dtype)


class ComposekitLoadModel:
    """Load a model (or none: the classic method) once per process; returns a COMPOSITOR."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("COMPOSITOR",)
    RETURN_NAMES = ("compositor",)
    FUNCTION = "load"
    DESCRIPTION = "A composekit Compositor: a model folder, Hub id or ONNX export; empty = the classic method."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {"required": {
            "model": ("STRING", {"default": "", "multiline": False,
                                 "tooltip": "model folder, Hub id or ONNX export; empty = classic method (no model)"}),
            "backend": (["auto", "torch", "onnxruntime", "openvino", "tensorrt"], {"default": "auto"}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
            "dtype": (["auto", "float32", "float16", "bfloat16"], {"default": "auto"}),
        }}

    def load(self, model: str, backend: str = "auto", device: str = "auto", dtype: str = "auto") -> tuple[Any]:
        return (_load(model, backend, device, dtype),)


class ComposekitPaste:
    """Paste an object into a background (or a batch of backgrounds) at a box or a region mask."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "edited")
    FUNCTION = "paste"
    DESCRIPTION = ("Generative object compositing: every pixel outside the edited region (the second output) is the "
                   "background's own.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        box = {n: ("INT", {"default": 0, "min": 0, "max": 16384, "step": 1,
                           "tooltip": "box corner in background pixels (x1, y1 exclusive); all 0 = use region_mask"})
               for n in ("x0", "y0", "x1", "y1")}
        seed = ("INT", {"default": 0, "min": 0, "max": int(SEED.hi), "tooltip": SEED.describe()})
        return {
            "required": {"compositor": ("COMPOSITOR",), "object": ("IMAGE",), "background": ("IMAGE",), **box,
                         "seed": seed, **{name: _widget(spec) for name, spec in _option_specs().items()}},
            "optional": {"object_mask": ("MASK", {"tooltip": "LoadImage's MASK of the object (1 = transparent)"}),
                         "region_mask": ("MASK", {"tooltip": "the editable region, background-sized (1 = edit)"})},
        }

    def paste(self, compositor: Any, object: Any, background: Any, x0: int = 0, y0: int = 0,  # noqa: A002
              x1: int = 0, y1: int = 0, seed: int = 0, object_mask: Any = None, region_mask: Any = None,
              **widgets: Any) -> tuple[Any, Any]:
        method = "generative" if compositor.backend is not None else "classic"
        specs = _option_specs()
        options = {}
        for name, value in widgets.items():
            spec = specs[name]  # an unknown input is a KeyError, as ComfyUI would not send one
            value = None if spec.nullable and value == AUTO else value
            if value != spec.default:
                options[name] = value  # the compositor refuses an option of the other method
        obj = _to_uint8(object, "object")
        if object_mask is not None:
            alpha = 255 - _mask_uint8(object_mask, 0, "object_mask")
            if alpha.shape != obj.shape[:2]:
                raise InputError(f"object_mask is {alpha.shape[1]}x{alpha.shape[0]}, the object "
                                 f"{obj.shape[1]}x{obj.shape[0]}; they must match")
            obj = np.dstack([obj[..., :3], alpha])
        box = (x0, y0, x1, y1) if (x1, y1) != (0, 0) else None
        backgrounds = background if getattr(background, "ndim", 3) == 4 else background[None]
        callback = _progress(options.get("steps", specs["steps"].default) * len(backgrounds)) \
            if method == "generative" else None
        jobs = []
        for i in range(len(backgrounds)):
            job: dict[str, Any] = {"object": obj, "background": _to_uint8(backgrounds[i], "background"), "box": box}
            if region_mask is not None:
                job["mask"] = _mask_uint8(region_mask, i, "region_mask") >= 128
            if method == "generative":
                job["seed"] = seed + i
            jobs.append(job)
        extra = {"callback": callback} if callback is not None else {}
        if len(jobs) == 1:
            job = jobs[0]
            results = [compositor.paste(job["object"], job["background"], job["box"], mask=job.get("mask"),
                                        seed=job.get("seed"), progress=False, **extra, **options)]
        else:
            results = compositor.paste_batch(jobs, batch_size=len(jobs), **extra, **options)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return (_to_image([np.asarray(r.image) for r in results]),
                _to_mask([r.mask.astype(np.float32) for r in results]))


def _progress(total: int) -> Any:
    """A sampler callback that moves ComfyUI's progress bar and honours its cancel button (when importable)."""
    try:
        import comfy.model_management as management
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)
    done = [0]

    def step(i: int, t: int, latents: Any) -> None:
        management.throw_exception_if_processing_interrupted()
        done[0] += 1
        bar.update_absolute(done[0], total)

    return step


def example_workflow() -> dict[str, Any]:
    """A ComfyUI workflow in its API format: load a model and two images, paste, save (docs/comfyui-workflow.json
    is this, checked by a test). Widget values are the declared defaults."""
    paste_inputs: dict[str, Any] = {"compositor": ["1", 0], "object": ["2", 0], "object_mask": ["2", 1],
                                    "background": ["3", 0], "x0": 380, "y0": 208, "x1": 504, "y1": 300, "seed": 0}
    for name, entry in ComposekitPaste.INPUT_TYPES()["required"].items():
        if name not in paste_inputs and len(entry) > 1 and "default" in entry[1]:
            paste_inputs[name] = entry[1]["default"]
    return {
        "1": {"class_type": "ComposekitLoadModel", "inputs": {"model": "Fantasy-Studio/Paint-by-Example",
                                                              "backend": "auto", "device": "auto", "dtype": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "object.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "background.png"}},
        "4": {"class_type": "ComposekitPaste", "inputs": paste_inputs},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "composekit"}},
    }


NODE_CLASS_MAPPINGS = {"ComposekitLoadModel": ComposekitLoadModel, "ComposekitPaste": ComposekitPaste}
NODE_DISPLAY_NAME_MAPPINGS = {"ComposekitLoadModel": "Load composekit model", "ComposekitPaste": "composekit Paste"}


def install(custom_nodes: str | Path) -> Path:
    """Write the shim ``custom_nodes/composekit/__init__.py`` (atomically); returns its path."""
    from composekit.formats.atomic import atomic_file

    folder = Path(custom_nodes)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give ComfyUI's custom_nodes folder")
    (folder / "composekit").mkdir(exist_ok=True)
    path = folder / "composekit" / "__init__.py"
    with atomic_file(path) as f:
        f.write(f'"""composekit\'s ComfyUI nodes (composekit.apps.comfyui)."""\n{SHIM}'.encode())
    return path


if __name__ == "__main__":  # pragma: no cover - python -m composekit.apps.comfyui CUSTOM_NODES_DIR
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m composekit.apps.comfyui ComfyUI/custom_nodes\n")
        raise SystemExit(2)
    try:
        print(f"wrote {install(sys.argv[1])}")
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
