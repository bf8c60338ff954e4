"""TensorRT backend: runs the engines built by ``composekit-export tensorrt``, without torch.

NOT RUN BY THE PROJECT ON TENSORRT: no machine this project was built and tested on had TensorRT
or could carry it. The backend is written against TensorRT 10's Python API (named tensors,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) with CuPy buffers. The tests run
this module's own code — engine-directory reading, sidecar checks, tensor-name and shape checks,
buffer planning and binding by address, per-thread execution contexts — against a stand-in for
TensorRT that executes the ONNX graphs with ONNX Runtime on host buffers
(``tests/fake_tensorrt.py``); they do not show that TensorRT itself accepts these calls.

How a call runs:

1. Loading checks every engine's sidecar against this TensorRT and GPU
   (:func:`composekit.formats.engine_dir.check_engine`: sha256, TensorRT version, compute capability) and
   refuses a stale engine with "rebuild with ...", then checks that each engine's tensors are the
   ones the spec names.
2. Each thread gets its own execution context per engine (contexts are not thread-safe), created
   on first use.
3. Per context and input shape, the input and output buffers are allocated once and bound by
   address; a call copies its inputs into them (casting to the engine's dtype), sets the input
   shapes, enqueues the engine on the thread's own CUDA stream (ordered with CuPy's current stream
   by events) and returns float32 copies of the outputs.
4. ``cuda_graph=True`` captures the U-Net's enqueue into a CUDA graph per input shape (after one
   ordinary run) and replays it, removing the per-kernel launch cost from the step loop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from composekit.backends.arrays import ArrayModule
from composekit.backends.graph import GraphBackend
from composekit.core.devices import Device, parse_device
from composekit.core.options import check_bool
from composekit.errors import BackendUnavailableError, InputError, ModelError, install_hint
from composekit.formats.engine_dir import (
    REBUILD_HINT,
    EngineDir,
    check_engine,
    engine_components,
    gpu_identity,
    read_engine_dir,
)

__all__ = ["TensorRTBackend", "load"]

logger = logging.getLogger(__name__)


class _Binding:
    """One execution context's buffers for one set of input shapes, bound by address."""

    def __init__(self, buffers: dict[str, Any]) -> None:
        self.buffers = buffers
        self.graph: Any = None  # a captured CUDA graph (U-Net, cuda_graph=True)
        self.runs = 0


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, root: Path | EngineDir, *, trt: Any, arrays: ArrayModule, gpu: tuple[str, str],
                 verify_engines: bool = True, cuda_graph: bool = False) -> None:
        if cuda_graph and not arrays.on_gpu:
            raise InputError("cuda_graph=True needs a CUDA device")
        engine_dir = root if isinstance(root, EngineDir) else read_engine_dir(root)
        self.trt, self.arrays, self.cuda_graph = trt, arrays, cuda_graph
        self.precision = engine_dir.manifest.precision
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def read(name: str, path: Path) -> Any:
            # Sidecar and compatibility checks before the bytes reach TensorRT.
            sidecar = check_engine(path, tensorrt_version=str(trt.__version__), gpu_name=gpu[0],
                                   compute_capability=gpu[1], verify_hash=verify_engines)
            if sidecar.component != name:
                raise ModelError(f"{path}: its sidecar describes component {sidecar.component!r}, not {name!r}")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ModelError(f"TensorRT could not deserialize {path}; {REBUILD_HINT}")
            return engine

        def io(engine: Any) -> tuple[list, list]:
            """(name, dtype, shape) of the engine's inputs and outputs; -1 (dynamic) sizes as None."""
            tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            rows = {t: (t, np.dtype(trt.nptype(engine.get_tensor_dtype(t))).name,
                        [None if int(d) < 0 else int(d) for d in engine.get_tensor_shape(t)]) for t in tensors}
            inputs = [t for t in tensors if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT]
            return [rows[t] for t in inputs], [rows[t] for t in tensors if t not in inputs]

        self.engines: dict[str, Any] = self._open_export(engine_dir.manifest, engine_components(engine_dir.manifest),
                                                         read, io, "TensorRT", path_of=engine_dir.path,
                                                         source=engine_dir.root)
        self.dtypes: dict[str, dict[str, np.dtype]] = {
            name: {t: np.dtype(trt.nptype(engine.get_tensor_dtype(t)))
                   for t in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))}
            for name, engine in self.engines.items()}
        self._local = threading.local()
        self._lock = threading.Lock()
        self.contexts_created = 0

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graph else ""
        return f"TensorRT {self.trt.__version__} on {self.arrays.device_type}:{self.arrays.device_id}, " \
               f"{self.precision}{self._export_notes()}{graphs}"

    # -- per-thread contexts and bound buffers ----------------------------------------------------

    def _context(self, name: str) -> tuple[Any, dict[tuple, _Binding]]:
        """This thread's execution context for ``name`` (2.), and its bindings by input shapes."""
        contexts = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = self._local.contexts = {}
        if name not in contexts:
            with self._lock:
                context = self.engines[name].create_execution_context()
                self.contexts_created += 1
            if context is None:
                raise BackendUnavailableError(f"TensorRT could not create an execution context for {name} "
                                              "(out of GPU memory?)")
            contexts[name] = (context, {})
        return contexts[name]

    def _binding(self, name: str, context: Any, bindings: dict[tuple, _Binding], shapes: dict[str, tuple]) -> _Binding:
        """Buffers for these input shapes, allocated once and bound by address (3.)."""
        key = tuple(sorted(shapes.items()))
        if key in bindings:
            return bindings[key]
        spec, dtypes = self.specs[name], self.dtypes[name]
        outputs = spec.output_shapes(shapes)  # raises InputError outside the engine's profile
        for tensor, shape in shapes.items():
            context.set_input_shape(tensor, shape)
        for tensor, shape in outputs.items():
            engine_shape = tuple(int(d) for d in context.get_tensor_shape(tensor))
            if engine_shape != shape:
                raise ModelError(f"{name} engine gives {tensor} the shape {engine_shape}; the spec expects {shape}. "
                                 f"{REBUILD_HINT}")
        buffers = {t: self.arrays.empty(s, dtypes[t]) for t, s in (*shapes.items(), *outputs.items())}
        bindings[key] = _Binding(buffers)
        return bindings[key]

    def _run(self, name: str, inputs: dict[str, Any]) -> list[Any]:
        arrays = self.arrays
        context, bindings = self._context(name)
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in inputs.items()}
        binding = self._binding(name, context, bindings, shapes)
        with arrays.side_stream() as stream:
            for tensor, value in inputs.items():
                arrays.xp.copyto(binding.buffers[tensor], value, casting="unsafe")
            # Shapes and addresses are set on every call: one context serves batch 1 and batch 2 in turn.
            for tensor, shape in shapes.items():
                if not context.set_input_shape(tensor, shape):
                    raise InputError(f"TensorRT refused shape {shape} for {name}.{tensor}; {REBUILD_HINT}")
            for tensor, buf in binding.buffers.items():
                context.set_tensor_address(tensor, arrays.pointer(buf))
            if self.cuda_graph and name in ("unet", "unet_shallow") and binding.graph is None and binding.runs >= 1:
                # 4. Capture once TensorRT has run these shapes (it must, before a capture).
                stream.begin_capture()
                context.execute_async_v3(arrays.stream_handle(stream))
                binding.graph = stream.end_capture()
            if binding.graph is not None:
                binding.graph.launch(stream)
            elif not context.execute_async_v3(arrays.stream_handle(stream)):
                raise ModelError(f"TensorRT failed to run the {name} engine; see the TensorRT log")
            binding.runs += 1
            return [binding.buffers[t].astype(np.float32) for t in self.specs[name].output_names]


def _runtime_environment(device: Any) -> tuple[Any, ArrayModule, tuple[str, str]]:
    """TensorRT, the GPU's arrays and the GPU's identity; clear errors when any is missing."""
    parsed = parse_device("cuda" if device is None else device, backend="tensorrt", allowed=("cuda",))
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the tensorrt backend needs TensorRT, cuda-python and CuPy ({install_hint('trt')}; CuPy: the cuda12 or "
            "cuda13 extra) "
            "(and an NVIDIA GPU); exported ONNX models also run with backend='onnxruntime'"
        ) from exc
    arrays = ArrayModule(Device("cuda", parsed.index or 0))
    return trt, arrays, gpu_identity(arrays.device_id)


def load(content: EngineDir, *, device: Any = None, dtype: Any = None, cuda_graph: bool = False,
         verify_engines: bool = True, vae: str | None = None, local_files_only: bool = False) -> TensorRTBackend:
    """Open an engine directory (read by :func:`composekit.formats.engine_dir.read_engine_dir`). The precision was fixed
    when the engines were built, and so was the decoder: ``vae`` must be None (the builder makes no tiny
    decoder engine yet; the exported model runs the tiny decoder with backend='onnxruntime' or 'openvino')."""
    if vae is not None:
        raise InputError(f"vae={vae!r}: TensorRT engines decode with the VAE decoder engine they were built with, and "
                         "the builder makes no tiny decoder engine yet; pass vae=None, or run the export (made with "
                         "--tiny-vae) with backend='onnxruntime' or 'openvino' and vae='tiny'")
    if dtype is not None:
        raise InputError(f"dtype={dtype!r}: a TensorRT engine's precision is fixed when it is built, "
                         "from the ONNX export's precision (`composekit-export onnx --fp16` for float16); pass dtype=None")
    cuda_graph = check_bool("cuda_graph", cuda_graph)
    trt, arrays, gpu = _runtime_environment(device)
    return TensorRTBackend(content, trt=trt, arrays=arrays, gpu=gpu, verify_engines=verify_engines,
                           cuda_graph=cuda_graph)
