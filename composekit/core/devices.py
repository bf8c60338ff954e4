"""One parser for device strings, used by every backend and by the buffers of the exported-model runtimes.

``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (torch), ``"gpu"``, ``"gpu.1"``, ``"npu"`` (OpenVINO's
Intel devices); case and surrounding spaces do not matter, and a ``torch.device`` works too. Each
backend says which kinds it runs on; a kind it does not run on is a
:class:`~composekit.errors.BackendUnavailableError` that names the backends that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from composekit.errors import BackendUnavailableError, InputError

__all__ = ["Device", "parse_device", "KINDS"]

# kind -> what it is and the backends that run on it (for messages)
NAMES = {"cpu": "the CPU", "cuda": "CUDA GPUs", "mps": "Apple GPUs (MPS)", "gpu": "Intel GPUs", "npu": "Intel NPUs"}
KINDS = {"cpu": "torch, onnxruntime, openvino", "cuda": "torch, onnxruntime (onnxruntime-gpu), tensorrt",
         "mps": "torch", "gpu": "openvino (Intel GPUs)", "npu": "openvino (Intel NPUs)"}


@dataclass(frozen=True, repr=False)
class Device:
    """A parsed device: its kind and index (None = the default one of that kind)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def __repr__(self) -> str:  # as the caller wrote it, for messages: 'cuda:1'
        return repr(str(self))


def parse_device(device: Any, *, backend: str, allowed: tuple[str, ...]) -> Device | None:
    """``device`` (None stays None: the backend picks) checked against the kinds ``backend`` runs on.

    A string is parsed once, where the caller's value enters (``Compositor.from_pretrained``); the
    :class:`Device` it gives is passed on, and each backend only checks its kind here."""
    if device is None:
        return None
    if isinstance(device, Device):
        parsed, shown = device, str(device)
    else:
        text = str(device).strip().lower()
        kind, sep, index = text.replace(".", ":", 1).partition(":")
        if kind not in KINDS or (sep and not index.isdigit()) or len(index) > 6:
            raise InputError(f"device {str(device)[:40]!r} is not supported; use 'cpu', 'cuda', 'cuda:N', 'mps', or "
                             "OpenVINO's 'gpu', 'gpu.N', 'npu'")
        parsed, shown = Device(kind, int(index) if sep else None), str(device)
    if parsed.kind not in allowed:
        raise BackendUnavailableError(f"the {backend} backend runs on {' and '.join(NAMES[k] for k in allowed)} only; "
                                      f"got device={shown!r}. {parsed.kind} devices run with: {KINDS[parsed.kind]}")
    return parsed
