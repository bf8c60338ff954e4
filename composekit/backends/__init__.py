"""Backend registry. Each backend module imports its heavy dependency only when it is loaded."""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError, install_hint
from ..engines import is_engine_dir
from ..manifest import is_export_dir
from .base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo", "BACKENDS", "load_backend", "choose_backend", "detect_backend"]

logger = logging.getLogger(__name__)

# name -> (module, loader function, the pip extra that provides it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("composekit.backends.torch_backend", "load", "torch"),
    "onnxruntime": ("composekit.backends.onnxruntime_backend", "load", "onnx"),
    "openvino": ("composekit.backends.openvino_backend", "load", "openvino"),
    "tensorrt": ("composekit.backends.tensorrt_backend", "load", "trt"),
}


# What each backend loads, for messages that name the backend a directory needs.
HOLDS = {"tensorrt": "a TensorRT engine directory", "onnxruntime": "an exported (ONNX) model",
         "openvino": "an exported (ONNX) model", "torch": "a diffusers-layout model directory"}


def detect_backend(model_dir: Path) -> str:
    """The backend family for what ``model_dir`` holds: engines (``engines.json``), an ONNX export
    (``manifest.json``: ``"onnxruntime"``, see :func:`choose_backend` for OpenVINO) or, otherwise, a
    diffusers-layout model (``"torch"``)."""
    return "tensorrt" if is_engine_dir(model_dir) else "onnxruntime" if is_export_dir(model_dir) else "torch"


def _export_runtime(device: Any, optimized: str | None) -> tuple[str, str]:
    """(backend, why) for an ONNX export under ``backend="auto"``."""
    import importlib.util

    kind = str(device).split(":")[0].lower() if device is not None else None
    if optimized:
        return "onnxruntime", f"the export's U-Net was fused for onnxruntime (--optimize {optimized})"
    if kind == "cuda":
        return "onnxruntime", "device='cuda' was asked for (onnxruntime's CUDA provider; it raises if absent)"
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if kind is None and has_ort:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return "onnxruntime", "onnxruntime offers CUDA here"
    if importlib.util.find_spec("openvino") is not None:
        return "openvino", "no CUDA asked for or offered, and OpenVINO is installed (the faster CPU runtime)"
    return "onnxruntime", ("no CUDA asked for or offered; OpenVINO is not installed (the openvino extra is faster "
                           "on CPUs)")


def choose_backend(requested: str, model_dir: Path, device: Any = None, optimized: str | None = None) -> str:
    """Resolve ``"auto"``; an explicit name always wins (and is checked).

    ``"auto"`` picks ``"tensorrt"`` for an engine directory (``engines.json``) and ``"torch"`` for a
    diffusers-layout model directory. For an ONNX export directory (``manifest.json``) it picks
    ``"onnxruntime"`` when CUDA is asked for (``device="cuda"``) or offered by onnxruntime, else
    ``"openvino"`` when OpenVINO is installed, else ``"onnxruntime"`` (always for an export fused for
    onnxruntime, ``optimized``). The choice is logged with why.
    """
    if requested != "auto":
        if requested not in BACKENDS:
            raise InputError(f"unknown backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        return requested
    choice, why = detect_backend(model_dir), "by the directory's contents"
    if choice == "onnxruntime":
        choice, why = _export_runtime(device, optimized)
    logger.info("backend='auto' chose %r for %s: %s", choice, model_dir, why)
    return choice


def load_backend(name: str, model_dir: Path, **options: Any) -> Backend:
    """Import backend ``name`` and load the model in ``model_dir`` with it."""
    module_name, func, extra = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed ({exc.name or exc}); {install_hint(extra)}"
        ) from exc
    loader = getattr(module, func)
    accepted = set(inspect.signature(loader).parameters) - {"model_dir"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(f"backend {name!r} takes no option(s) {unknown}; it accepts {sorted(accepted)}")
    return loader(model_dir, **options)
