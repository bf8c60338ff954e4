"""ONNX Runtime backend: runs an exported model (``composekit-export onnx``) without PyTorch.

The sampler's arithmetic stays in float32 whatever the export precision: each graph call casts its
inputs to the graph's precision and its outputs back.

Two ways to call a graph:

- plain ``session.run`` with numpy arrays on the host (the default on the CPU);
- IO binding (``io_binding=True``, the default with a CUDA provider): inputs and outputs are bound
  to preallocated buffers by address (their shapes come from :mod:`composekit.specs`), so on CUDA
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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..configs import inside
from ..errors import BackendUnavailableError, InputError, ModelError, install_hint
from ..engines import is_engine_dir
from ..manifest import ExportManifest, is_export_dir, read_manifest
from ..specs import COMPONENT_NAMES
from .arrays import ArrayModule
from .base import ModelInfo, model_call

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
    kind = str(device).split(":")[0]
    if kind == "cuda":
        if not gpu:
            raise BackendUnavailableError(
                f"device {device!r} was requested but onnxruntime offers no GPU provider (available: {available}); "
                f"{install_hint('gpu')}, or pass device='cpu'"
            )
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        return [(p, {"device_id": index}) for p in gpu] + ["CPUExecutionProvider"]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    raise InputError(f"device {device!r} is not supported by the onnxruntime backend; use 'cpu' or 'cuda'")


def _tensors_with_data(model: Any) -> Any:
    """Every tensor of a graph that may carry external data: initializers, attribute tensors and the
    values and indices of sparse initializers, in the main graph and every subgraph."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def check_external_data(path: Path, root: Path) -> None:
    """Refuse a graph whose external-data references leave ``root`` (absolute, ``..``, symlinks out).

    Reads only the graph's protobuf (``load_external_data=False``), never the referenced files.
    Sparse initializers are checked too (ONNX Runtime releases before late 2025 do not check them).
    """
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError as exc:
        raise BackendUnavailableError(
            f"checking an exported graph's external data needs the onnx package; {install_hint('onnx')}"
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX graph ({type(exc).__name__}: {exc}); re-export the model") \
            from None
    for tensor in _tensors_with_data(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            target = inside(root, location, "external data", "export directory")
            if target.is_symlink():
                raise ModelError(f"{target} is a symlink")
        except ModelError as exc:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} points its external data at {location!r}, outside the export "
                f"directory {root}; refusing to load it (re-export the model). ({exc})"
            ) from None


_ORT_FLOATS = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}


def check_graph_io(session: Any, spec: Any, precision: str, path: Path) -> None:
    """The graph's inputs and outputs are the spec's: names, ranks, fixed sizes and the manifest's precision.

    Catches a graph swapped for another (with its sha256 updated) and a manifest whose precision or
    dimensions contradict the graphs, at load time instead of inside the first run.
    """
    want = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    got = {a.name: a for a in (*session.get_inputs(), *session.get_outputs())}
    if sorted(a.name for a in session.get_inputs()) != sorted(spec.input_names) or \
            sorted(a.name for a in session.get_outputs()) != sorted(spec.output_names):
        raise ModelError(f"{path}: graph inputs {sorted(a.name for a in session.get_inputs())} and outputs "
                         f"{sorted(a.name for a in session.get_outputs())} are not the {spec.name} spec's "
                         f"{spec.input_names} / {spec.output_names}; the file is not this export's graph. Re-export")
    for name, tensor in want.items():
        arg = got[name]
        dtype = "tensor(int64)" if tensor.dtype == "int64" else _ORT_FLOATS[precision]
        if arg.type != dtype:
            raise ModelError(f"{path}: {name} is {arg.type}, but the manifest's precision {precision!r} needs {dtype}; "
                             "the manifest and the graphs disagree. Re-export")
        shape = list(arg.shape)
        if len(shape) != len(tensor.shape) or any(isinstance(w, int) and isinstance(g, int) and w != g
                                                  for w, g in zip(tensor.shape, shape)):
            raise ModelError(f"{path}: {name} has shape {shape}; the manifest's dimensions give {list(tensor.shape)}. "
                             "The manifest and the graphs disagree. Re-export")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: ExportManifest, providers: list[Any], session_options: Any,
                 arrays: ArrayModule | None = None, io_binding: bool = False) -> None:
        """``io_binding``: call graphs through IO binding with buffers of ``arrays``' device (host by default)."""
        import onnxruntime as ort

        self.manifest = manifest
        self.arrays = arrays or ArrayModule("cpu")
        self.io_binding = io_binding
        self.specs = manifest.specs()
        self.sessions = {}
        for name in COMPONENT_NAMES:
            path = manifest.path(name)
            check_external_data(path, manifest.root)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), sess_options=session_options,
                                                           providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(f"onnxruntime could not load {path}: {exc}") from exc
            check_graph_io(self.sessions[name], self.specs[name], manifest.precision, path)
        self.providers = self.sessions["unet"].get_providers()
        self.float = np.float16 if manifest.precision == "fp16" else np.float32
        self.info = ModelInfo.from_manifest(manifest, str(manifest.root))

    def describe(self) -> str:
        binding = f", IO binding on {self.arrays.device_type}" if self.io_binding else ""
        return f"{self.providers[0]}, {self.manifest.precision}{binding}"

    def _run(self, name: str, **inputs: Any) -> list[Any]:
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

    # -- plumbing ---------------------------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> Any:
        return self.arrays.from_host(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.arrays.to_host(x)

    def cat(self, xs: list[Any], axis: int) -> Any:
        return self.arrays.concatenate(xs, axis)

    def synchronize(self) -> None:
        self.arrays.synchronize()

    # -- the four components ----------------------------------------------------------------------

    @model_call("image encoder")
    def encode_object(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        context, uncond = self._run("object_encoder", pixel_values=self.asarray(pixels))
        return context, uncond

    @model_call("VAE encoder")
    def encode_image(self, image: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", image=image)[0]

    @model_call("U-Net")
    def unet(self, sample: Any, timestep: int, context: Any) -> Any:
        t = self.arrays.from_host(np.full((sample.shape[0],), int(timestep), dtype=np.int64), np.int64)
        return self._run("unet", sample=sample, timestep=t, encoder_hidden_states=context)[0]

    @model_call("VAE decoder")
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", latent=latents)[0]


def load(model_dir: Path, *, device: Any = None, dtype: Any = None, providers: Sequence[Any] | None = None,
         intra_op_threads: int | None = None, inter_op_threads: int | None = None,
         graph_optimization: str = "all", io_binding: bool | None = None) -> OnnxRuntimeBackend:
    """Load an export directory. ``dtype`` must be None or the export's precision (it is fixed at export).

    ``io_binding``: None = on with a CUDA provider (latents stay on the GPU, needs CuPy), off on the
    CPU; True on the CPU binds host buffers (same results as plain runs).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the onnxruntime backend needs onnxruntime; {install_hint('onnx')} (CPU), or for CUDA: "
            f"{install_hint('gpu')}"
        ) from exc
    model_dir = Path(model_dir)
    if is_engine_dir(model_dir) and not is_export_dir(model_dir):
        raise ModelError(f"{model_dir} is a TensorRT engine directory; load it with backend='tensorrt', or load "
                         "the ONNX export it was built from with backend='onnxruntime'")
    if not is_export_dir(model_dir):
        raise ModelError(
            f"{model_dir} is not an exported model (no manifest.json); export it first with "
            f"`composekit-export onnx {model_dir} OUT_DIR`, or use backend='torch'"
        )
    manifest = read_manifest(model_dir)
    if dtype is not None and str(dtype).replace("float", "fp").replace("torch.", "") not in (manifest.precision,):
        raise InputError(
            f"dtype {dtype!r} does not match the export's precision {manifest.precision!r}; "
            "re-export with the precision you want or pass dtype=None"
        )
    if graph_optimization not in _OPT_LEVELS:
        raise InputError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
    for attr, value in (("intra_op_num_threads", intra_op_threads), ("inter_op_num_threads", inter_op_threads)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{attr.replace('_num', '')} must be a non-negative integer, got {value!r}")
            setattr(options, attr, value)
    chosen = _providers(ort, device, providers)
    first = chosen[0][0] if isinstance(chosen[0], (tuple, list)) else chosen[0]
    on_gpu = first in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if io_binding is None:
        io_binding = on_gpu
    if not isinstance(io_binding, bool):
        raise InputError(f"io_binding must be True, False or None, got {io_binding!r}")
    arrays = None  # host buffers
    if io_binding and on_gpu:
        index = chosen[0][1].get("device_id", 0) if isinstance(chosen[0], (tuple, list)) and len(chosen[0]) > 1 else 0
        arrays = ArrayModule(f"cuda:{index}")
    return OnnxRuntimeBackend(manifest, chosen, options, arrays, io_binding)
