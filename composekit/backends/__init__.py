"""The backend registry: one row per backend, and the one place a model directory is opened.

A row names the backend's module (imported only when it is used, so its heavy dependency is too),
the pip extra that provides that dependency, and the marker file of the directories it opens:

- ``engines.json``: a TensorRT engine directory (:func:`composekit.formats.engine_dir.read_engine_dir`);
- ``manifest.json``: an ONNX export (:func:`composekit.formats.export_manifest.read_manifest`);
- ``model_index.json``: a diffusers-layout model directory (:func:`composekit.formats.model_source.read_model_dir`).

:func:`open_backend` reads the directory once with its marker's reader and hands what it read to the
backend module's ``load``; the backend returns itself with a :class:`~composekit.backends.base.ModelCard`
(model info, scheduler and feature-extractor configs, backdrop). A new backend is one module with a
``load(content, **options)`` and one row here.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from composekit.backends.base import Backend, ModelCard, ModelInfo
from composekit.core.devices import KINDS, parse_device
from composekit.errors import BackendUnavailableError, InputError, ModelError, install_hint
from composekit.formats.engine_dir import ENGINES, read_engine_dir
from composekit.formats.export_manifest import MANIFEST, read_manifest
from composekit.formats.model_source import read_model_dir

__all__ = ["Backend", "ModelCard", "ModelInfo", "BACKENDS", "BackendRow", "open_backend", "choose_backend",
           "directory_marker"]

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class BackendRow:
    module: str  # imported when the backend is used; its ``load(content, **options)`` opens the model
    extra: str  # the pip extra that installs its dependency
    marker: str  # the file that marks the directories it opens


BACKENDS: dict[str, BackendRow] = {
    "torch": BackendRow("composekit.backends.torch_backend", "torch", MODEL_INDEX),
    "onnxruntime": BackendRow("composekit.backends.onnxruntime_backend", "onnx", MANIFEST),
    "openvino": BackendRow("composekit.backends.openvino_backend", "openvino", MANIFEST),
    "tensorrt": BackendRow("composekit.backends.tensorrt_backend", "trt", ENGINES),
}

# marker -> (what such a directory is, how it is read: once per load)
_KINDS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    ENGINES: ("a TensorRT engine directory", read_engine_dir),
    MANIFEST: ("an exported (ONNX) model", read_manifest),
    MODEL_INDEX: ("a diffusers-layout model directory", read_model_dir),
}


def directory_marker(root: Path) -> str:
    """What ``root`` holds, by marker file: engines, an export, or (otherwise) a diffusers-layout model."""
    return ENGINES if (root / ENGINES).is_file() else MANIFEST if (root / MANIFEST).is_file() else MODEL_INDEX


def _holds(root: Path, marker: str) -> bool:
    """Whether ``root`` is a directory of ``marker``'s kind (a model directory is one that is neither other kind,
    so that its own reader explains what is missing)."""
    return directory_marker(root) == MODEL_INDEX if marker == MODEL_INDEX else (root / marker).is_file()


def _wrong_directory(name: str, root: Path) -> ModelError:
    found = directory_marker(root)
    what = _KINDS[found][0]
    fits = [n for n, r in BACKENDS.items() if r.marker == found]
    use = " or ".join(repr(n) for n in fits)
    marker = BACKENDS[name].marker
    if marker == MANIFEST:
        return ModelError(f"{root} is not an exported model (no {MANIFEST}): it is {what}. Export it first with "
                          f"`composekit-export onnx {root} OUT_DIR`, or load it with backend={use}")
    if marker == ENGINES:
        return ModelError(f"{root} is not a TensorRT engine directory (no {ENGINES}): it is {what}. Build one with "
                          f"`composekit-export tensorrt ONNX_EXPORT_DIR ENGINE_DIR`, or load it with backend={use}")
    return ModelError(f"{root} is {what}; load it with backend={use} (or 'auto')")


def _export_runtime(device: Any, optimized: str | None) -> tuple[str, str]:
    """(backend, why) for an ONNX export under ``backend="auto"``."""
    kind = None if device is None else parse_device(device, backend="auto", allowed=tuple(KINDS)).kind  # a Device
    if optimized:
        return "onnxruntime", f"the export's U-Net was fused for onnxruntime (--optimize {optimized})"
    if kind == "cuda":
        return "onnxruntime", "device='cuda' was asked for (onnxruntime's CUDA provider; it raises if absent)"
    if kind is None and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return "onnxruntime", "onnxruntime offers CUDA here"
    if importlib.util.find_spec("openvino") is not None:
        return "openvino", "no CUDA asked for or offered, and OpenVINO is installed (the faster CPU runtime)"
    return "onnxruntime", ("no CUDA asked for or offered; OpenVINO is not installed (the openvino extra is faster "
                           "on CPUs)")


def choose_backend(requested: str, root: Path, device: Any = None) -> tuple[str, Any]:
    """Resolve ``requested`` for ``root`` and read the directory (once): returns (backend name, what was read).

    An explicit name always wins, and must fit the directory. ``"auto"`` picks ``"tensorrt"`` for an
    engine directory and ``"torch"`` for a diffusers-layout model directory. For an ONNX export it picks
    ``"onnxruntime"`` when CUDA is asked for (``device="cuda"``) or offered by onnxruntime, or when the
    export was fused for onnxruntime; else ``"openvino"`` when OpenVINO is installed, else
    ``"onnxruntime"``. The choice is logged with why.
    """
    root = Path(root)
    if requested != "auto":
        if requested not in BACKENDS:
            raise InputError(f"unknown backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        marker = BACKENDS[requested].marker
        if not _holds(root, marker):
            raise _wrong_directory(requested, root)
        return requested, _KINDS[marker][1](root)
    marker = directory_marker(root)
    content = _KINDS[marker][1](root)
    if marker == MANIFEST:
        name, why = _export_runtime(device, content.optimized)
    else:
        name, why = next(n for n, r in BACKENDS.items() if r.marker == marker), "by the directory's contents"
    logger.info("backend='auto' chose %r for %s: %s", name, root, why)
    return name, content


# Load options that change the U-Net's function: an export has them traced into its graphs instead.
_EXPORT_TIME = {"token_downsampling": "have token downsampling traced in at export (composekit-export onnx "
                                      "--token-downsampling N; the manifest says which); load the export without it"}


def open_backend(name: str, content: Any, **options: Any) -> Backend:
    """Import backend ``name`` and open what :func:`choose_backend` read with it."""
    row = BACKENDS[name]
    try:
        module = importlib.import_module(row.module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed ({exc.name or exc}); {install_hint(row.extra)}"
        ) from exc
    accepted = set(inspect.signature(module.load).parameters) - {"content"}
    unknown = sorted(set(options) - accepted)
    for option in set(unknown) & set(_EXPORT_TIME):
        raise InputError(f"backend {name!r} runs exported graphs, which {_EXPORT_TIME[option]}")
    if unknown:
        raise InputError(f"backend {name!r} takes no option(s) {unknown}; it accepts {sorted(accepted)}")
    return module.load(content, **options)
