"""ONNX Runtime backend: runs an exported model (``composekit-export onnx``) without PyTorch.

The sampler's arithmetic stays in float32 whatever the export precision: each graph call casts its
inputs to the graph's precision and its outputs back.

Two ways to call a graph:

- plain ``session.run`` with numpy arrays on the host (the default on the CPU);
- IO binding (``io_binding=True``, the default with a CUDA provider): inputs and outputs are bound
  to preallocated buffers by address (their shapes come from :mod:`composekit.core.specs`), so on CUDA
  the latents stay in GPU memory (CuPy arrays) for the whole loop. The same binding code runs on the
  host with numpy buffers, which is how the project tests it.

Providers: an explicit ``providers`` list wins. Otherwise ``device="cuda"`` asks for the CUDA
execution provider (TensorRT's first when present) and raises if neither is available;
``device=None`` takes CUDA when onnxruntime offers it and the CPU otherwise, and logs the choice.

NOT RUN BY THE PROJECT: the CUDA providers (no GPU with onnxruntime-gpu was available to it). IO
binding is tested with host buffers only.

ONNX Runtime sessions may be run from several threads at once, so one backend serves concurrent
callers.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from composekit.backends.arrays import ArrayModule
from composekit.backends.graph import GraphBackend, check_export_dtype, graph_components
from composekit.core.devices import Device, parse_device
from composekit.core.options import THREADS, check_bool, check_integer
from composekit.core.specs import COMPONENT_NAMES
from composekit.errors import BackendUnavailableError, InputError, install_hint
from composekit.formats.export_manifest import ExportManifest

__all__ = ["OnnxRuntimeBackend", "load"]

logger = logging.getLogger(__name__)

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def _providers(ort, device: Any, providers: Sequence[Any] | None) -> list[Any]:
    available = ort.get_available_providers()
    if providers is not None:
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise BackendUnavailableError(
                f"onnxruntime providers {unknown} are not available here (available: {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT providers"
            )
        return list(providers)
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if device is None:
        chosen = gpu + ["CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        logger.info("device=None: onnxruntime providers %s (available: %s)", chosen, available)
        return chosen
    parsed = parse_device(device, backend="onnxruntime", allowed=("cpu", "cuda"))
    if parsed.kind == "cpu":
        return ["CPUExecutionProvider"]
    if not gpu:
        raise BackendUnavailableError(
            f"device {device!r} was requested but onnxruntime offers no GPU provider (available: {available}); "
            f"{install_hint('gpu')}, or pass device='cpu'"
        )
    return [(p, {"device_id": parsed.index or 0}) for p in gpu] + ["CPUExecutionProvider"]


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def _io(args: Any) -> list[tuple[str, str, list]]:
    """(name, dtype, shape) of a session's inputs or outputs, as :func:`check_graph_io` takes them."""
    return [(a.name, _ORT_TYPES.get(a.type, a.type), list(a.shape)) for a in args]


class OnnxRuntimeBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, manifest: ExportManifest, providers: list[Any], session_options: Any,
                 arrays: ArrayModule | None = None, io_binding: bool = False,
                 components: tuple[str, ...] = COMPONENT_NAMES) -> None:
        """``io_binding``: call graphs through IO binding with buffers of ``arrays``' device (host by default)."""
        import onnxruntime as ort

        self.arrays = arrays or ArrayModule("cpu")
        self.io_binding = io_binding
        self.sessions = self._open_export(
            manifest, components, lambda _, path: ort.InferenceSession(str(path), sess_options=session_options,
                                                                    providers=providers),
            lambda session: (_io(session.get_inputs()), _io(session.get_outputs())), "onnxruntime")
        self.providers = self.sessions["unet"].get_providers()

    def describe(self) -> str:
        binding = f", IO binding on {self.arrays.device_type}" if self.io_binding else ""
        return f"{self.providers[0]}, {self.manifest.precision}{self._export_notes()}{binding}"

    def _run(self, name: str, inputs: dict[str, Any]) -> list[Any]:
        if self.io_binding:
            return self._run_bound(name, inputs)
        feeds = {k: (v if v.dtype == np.int64 else v.astype(self.float, copy=False)) for k, v in inputs.items()}
        return [o.astype(np.float32, copy=False) for o in self.sessions[name].run(None, feeds)]

    def _run_bound(self, name: str, inputs: dict[str, Any]) -> list[Any]:
        """One graph call through IO binding: every input and output bound by address, no host copies."""
        arrays, session = self.arrays, self.sessions[name]
        spec = self.specs[name]
        typed = {k: arrays.cast(v, np.int64 if v.dtype == np.int64 else self.float) for k, v in inputs.items()}
        outputs = {k: arrays.empty(shape, self.float)
                   for k, shape in spec.output_shapes({k: v.shape for k, v in typed.items()}).items()}
        binding = session.io_binding()
        for key, buf in (*typed.items(), *outputs.items()):
            bind = binding.bind_input if key in typed else binding.bind_output
            bind(key, arrays.device_type, arrays.device_id, buf.dtype.type, tuple(buf.shape), arrays.pointer(buf))
        arrays.synchronize()  # inputs written on the array stream are complete before onnxruntime reads them
        session.run_with_iobinding(binding)
        return [arrays.cast(outputs[k], np.float32) for k in spec.output_names]


def load(content: ExportManifest, *, device: Any = None, dtype: Any = None, providers: Sequence[Any] | None = None,
         intra_op_threads: int | None = None, inter_op_threads: int | None = None,
         graph_optimization: str = "all", io_binding: bool | None = None, vae: str | None = None,
         local_files_only: bool = False) -> OnnxRuntimeBackend:
    """Open an export (read by :func:`composekit.formats.export_manifest.read_manifest`). ``dtype`` must be None or the export's precision (it is fixed at export).

    ``io_binding``: None = on with a CUDA provider (latents stay on the GPU, needs CuPy), off on the
    CPU; True on the CPU binds host buffers (same results as plain runs). ``vae="tiny"``: decode with
    the export's tiny decoder (``--tiny-vae``).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the onnxruntime backend needs onnxruntime; {install_hint('onnx')} (CPU), or for CUDA: "
            f"{install_hint('gpu')}"
        ) from exc
    manifest = content
    components = graph_components(manifest, vae)
    check_export_dtype(manifest, dtype, "re-export with the precision you want or pass dtype=None")
    if graph_optimization not in _OPT_LEVELS:
        raise InputError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
    for attr, value in (("intra_op_num_threads", intra_op_threads), ("inter_op_num_threads", inter_op_threads)):
        if check_integer(attr.replace("_num", ""), value, 0, THREADS.hi, nullable=True) is not None:
            setattr(options, attr, value)
    chosen = _providers(ort, device, providers)
    first = chosen[0][0] if isinstance(chosen[0], (tuple, list)) else chosen[0]
    on_gpu = first in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if io_binding is None:
        io_binding = on_gpu
    io_binding = check_bool("io_binding", io_binding)
    arrays = None  # host buffers
    if io_binding and on_gpu:
        index = chosen[0][1].get("device_id", 0) if isinstance(chosen[0], (tuple, list)) and len(chosen[0]) > 1 else 0
        arrays = ArrayModule(Device("cuda", index))
    return OnnxRuntimeBackend(manifest, chosen, options, arrays, io_binding, components)
