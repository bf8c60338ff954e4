"""Buffers for the exported-model backends: numpy on the host, CuPy on a CUDA device.

The ONNX Runtime backend (with IO binding) and the TensorRT backend hand graphs raw buffer
addresses. This module gives them one way to allocate, cast, concatenate and address arrays on
either side, so the same binding code runs on the host (where the project tests it) and on the GPU
(CuPy, imported only when a CUDA device is asked for). No torch.

Streams: :meth:`ArrayModule.side_stream` runs a graph call on the calling thread's own non-blocking
stream (TensorRT synchronises more on the legacy default stream, and CUDA graphs cannot be captured
on it), ordered after the array work queued before it and before the work queued after it by events
on CuPy's current stream; on the host everything is synchronous.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import numpy as np

from composekit.core.devices import parse_device
from composekit.errors import BackendUnavailableError, install_hint

__all__ = ["ArrayModule"]


class ArrayModule:
    """Arrays of one device: ``"cpu"`` (numpy) or ``"cuda"`` / ``"cuda:N"`` (CuPy)."""

    def __init__(self, device: Any = "cpu") -> None:
        parsed = parse_device(device, backend="buffers of the exported-model runtimes", allowed=("cpu", "cuda"))
        kind = parsed.kind
        self.device_type = kind
        self.device_id = parsed.index or 0
        self._local = threading.local()
        if kind == "cpu":
            self.xp: Any = np
            return
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"device {device!r} keeps arrays on the GPU with CuPy, which is not installed; "
                f"{install_hint('cuda12')} (the cuda13 extra for CUDA 13)"
            ) from exc
        try:
            cupy.cuda.Device(self.device_id).use()
        except Exception as exc:  # cupy raises CUDARuntimeError without a usable GPU
            raise BackendUnavailableError(f"device {device!r} is not usable: {exc}") from exc
        self.xp = cupy

    def __repr__(self) -> str:
        return f"ArrayModule({self.device_type}:{self.device_id})"

    @property
    def on_gpu(self) -> bool:
        return self.device_type == "cuda"

    # -- arrays -----------------------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def from_host(self, x: np.ndarray, dtype: Any = np.float32) -> Any:
        """A contiguous copy of a host array on this device, in ``dtype``."""
        return self.xp.asarray(np.ascontiguousarray(x, dtype=dtype))

    def to_host(self, x: Any) -> np.ndarray:
        """A host float32 numpy array (copied back from the GPU when needed)."""
        host = x.get() if self.on_gpu else x
        return np.asarray(host, dtype=np.float32)

    def cast(self, x: Any, dtype: Any) -> Any:
        """``x`` in ``dtype``, C-contiguous (no copy when it already is)."""
        return self.xp.ascontiguousarray(x.astype(dtype, copy=False))

    def concatenate(self, xs: list[Any], axis: int) -> Any:
        return self.xp.concatenate(xs, axis=axis)

    @staticmethod
    def pointer(x: Any) -> int:
        """The address of a contiguous array's first element."""
        return int(x.ctypes.data) if isinstance(x, np.ndarray) else int(x.data.ptr)

    # -- ordering ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[Any]:
        """Run the enclosed work on this thread's own stream (None on the host), ordered with the current one."""
        if not self.on_gpu:
            yield None
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self.xp.cuda.Stream(non_blocking=True)
        current = self.xp.cuda.get_current_stream()
        stream.wait_event(current.record())  # inputs queued on the current stream come first
        with stream:
            yield stream
        current.wait_event(stream.record())  # later work on the current stream waits for the outputs

    @staticmethod
    def stream_handle(stream: Any) -> int:
        """A stream's handle for APIs that enqueue work on it (0 on the host)."""
        return 0 if stream is None else int(stream.ptr)

    def synchronize(self) -> None:
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()
