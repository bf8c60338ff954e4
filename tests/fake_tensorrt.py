"""A stand-in for the parts of TensorRT 10's Python API that composekit's runtime calls.

It lets the tests run composekit's TensorRT backend — its engine-directory reading, sidecar
checks, name and shape checks, buffer binding by address and per-thread contexts — on a machine
without TensorRT or a GPU. An "engine" here is the ONNX graph's bytes; executing it runs the graph
with ONNX Runtime on the host, reading inputs from and writing outputs to the raw addresses the
backend bound, as TensorRT would on the device. It proves nothing about TensorRT itself.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import onnxruntime as ort

__version__ = "10.99.0-fake"
FAKE_GPU = ("Fake GPU", "9.0")  # (name, compute capability) the tests pretend to run on

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class Logger:
    WARNING = 2

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


def nptype(dtype):
    """TensorRT maps its DataType to numpy with trt.nptype; the fake's data types are numpy types."""
    return dtype


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            return Engine(data)
        except Exception:  # TensorRT returns None for bytes it cannot read
            return None


class Engine:
    def __init__(self, data: bytes) -> None:
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: _ONNX_TYPES[i.type] for i in self.session.get_inputs()}
        self.outputs = {o.name: _ONNX_TYPES[o.type] for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.contexts: list[Context] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return {**self.inputs, **self.outputs}[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """The engine's shape of a tensor, -1 where it is dynamic (as TensorRT reports it)."""
        args = {a.name: a for a in (*self.session.get_inputs(), *self.session.get_outputs())}
        return tuple(d if isinstance(d, int) else -1 for d in args[name].shape)

    def create_execution_context(self) -> "Context":
        context = Context(self)
        self.contexts.append(context)
        return context


class Context:
    """Records the thread that uses it: TensorRT contexts must not be shared between threads at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.threads: set[int] = set()
        self.busy = threading.Lock()
        self.runs = 0

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def _view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(self.engine.get_tensor_dtype(name))
        count = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * count).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _inputs(self) -> dict[str, np.ndarray]:
        return {n: self._view(n, self.shapes[n]).copy() for n in self.engine.inputs}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        # Output shapes from running the graph on zeros of the set input shapes (independent of composekit's specs).
        zeros = {n: np.zeros(self.shapes[n], self.engine.inputs[n]) for n in self.engine.inputs}
        outputs = self.engine.session.run([name], zeros)
        return tuple(outputs[0].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("fake TensorRT: one execution context used by two threads at once")
        try:
            self.threads.add(threading.get_ident())
            names = list(self.engine.outputs)
            for name, value in zip(names, self.engine.session.run(names, self._inputs())):
                self._view(name, value.shape)[...] = value
            self.runs += 1
            return True
        finally:
            self.busy.release()


def build_fake_engines(onnx_dir, out, compile_engine=None):
    """An engine directory whose "engines" are the export's ONNX bytes, with real sidecars (for the tests)."""
    from composekit_export.tensorrt_build import write_engine_dir

    return write_engine_dir(
        onnx_dir, out, compile_engine or (lambda name, path, spec: path.read_bytes()),
        tensorrt_version=__version__, gpu_name=FAKE_GPU[0], compute_capability=FAKE_GPU[1],
        build_flags={"fp16": False, "stand_in": "fake_tensorrt"})
