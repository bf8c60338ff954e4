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
    "tensorrt": ("composekit.backends.tensorrt_backend", "load", "trt"),
}


# What each backend loads, for messages that name the backend a directory needs.
HOLDS = {"tensorrt": "a TensorRT engine directory", "onnxruntime": "an exported (ONNX) model",
         "torch": "a diffusers-layout model directory"}


def detect_backend(model_dir: Path) -> str:
    """The backend for what ``model_dir`` holds: engines (``engines.json``), an ONNX export
    (``manifest.json``) or, otherwise, a diffusers-layout model."""
    return "tensorrt" if is_engine_dir(model_dir) else "onnxruntime" if is_export_dir(model_dir) else "torch"


def choose_backend(requested: str, model_dir: Path) -> str:
    """Resolve ``"auto"``; an explicit name always wins (and is checked).

    ``"auto"`` picks ``"tensorrt"`` for an engine directory (``engines.json``), ``"onnxruntime"`` for
    an ONNX export directory (``manifest.json``) and ``"torch"`` for a diffusers-layout model
    directory, and logs the choice.
    """
    if requested != "auto":
        if requested not in BACKENDS:
            raise InputError(f"unknown backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        return requested
    choice = detect_backend(model_dir)
    logger.info("backend='auto' chose %r for %s", choice, model_dir)
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
