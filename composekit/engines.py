"""TensorRT engine sidecars: what an engine was built with, and whether this machine may run it.

Every engine file ``NAME.plan`` has a sidecar ``NAME.plan.json`` written beside it (the engine's
bytes are never modified or prefixed): the component, the engine's sha256, the source ONNX file and
its sha256, the TensorRT version, the GPU name and compute capability, the build flags and the
optimisation profile. :func:`check_engine` refuses an engine whose bytes do not match its sidecar
(``ModelError``) or that was built for another TensorRT or GPU architecture
(``EngineIncompatibleError``, saying how to rebuild). Pure Python: no TensorRT import.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineIncompatibleError, ModelError
from .files import atomic_file
from .loading import read_json
from .manifest import sha256_file

__all__ = ["EngineSidecar", "sidecar_path", "write_sidecar", "read_sidecar", "check_engine", "REBUILD_HINT"]

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "composekit-trt-engine"
REBUILD_HINT = "rebuild the engines on this machine with `composekit-export tensorrt ONNX_EXPORT_DIR ENGINE_DIR`"


@dataclass(frozen=True)
class EngineSidecar:
    component: str
    engine_file: str
    engine_sha256: str
    source_onnx: str
    source_onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    build_flags: dict[str, Any] = field(default_factory=dict)  # fp16, version_compatible, hardware_compatible, ...
    profile: dict[str, Any] = field(default_factory=dict)  # input -> [min, opt, max]
    composekit_version: str = ""
    created: str = ""
    format: str = SIDECAR_FORMAT


def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(engine)}.json")


def write_sidecar(engine: str | os.PathLike, sidecar: EngineSidecar) -> Path:
    """Write the sidecar atomically (temporary file + rename)."""
    path = sidecar_path(engine)
    data = asdict(sidecar)
    if not data["created"]:
        data["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_file(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())
    return path


def read_sidecar(engine: str | os.PathLike) -> EngineSidecar:
    path = sidecar_path(engine)
    data = read_json(path, fix=REBUILD_HINT, missing=f"engine {engine} has no sidecar {path.name}; {REBUILD_HINT}")
    if data.get("format") != SIDECAR_FORMAT:
        raise ModelError(f"{path} is not a composekit engine sidecar; {REBUILD_HINT}")
    try:
        return EngineSidecar(**{k: data[k] for k in EngineSidecar.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise ModelError(f"sidecar {path} lacks fields ({exc}); {REBUILD_HINT}") from None


def check_engine(engine: str | os.PathLike, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                 verify_hash: bool = True) -> EngineSidecar:
    """Refuse an engine this runtime must not load; return its sidecar when it may be loaded."""
    engine = Path(engine)
    sidecar = read_sidecar(engine)
    if not engine.is_file():
        raise ModelError(f"engine {engine} is missing; {REBUILD_HINT}")
    if verify_hash and sha256_file(engine) != sidecar.engine_sha256:
        raise ModelError(
            f"engine {engine} does not match the sha256 in its sidecar: it was modified or copied incompletely; "
            f"{REBUILD_HINT}"
        )
    flags = sidecar.build_flags or {}
    built = f"TensorRT {sidecar.tensorrt_version} for {sidecar.gpu_name} (sm {sidecar.compute_capability})"
    here = f"TensorRT {tensorrt_version} on {gpu_name} (sm {compute_capability})"
    if sidecar.tensorrt_version != tensorrt_version and not flags.get("version_compatible"):
        raise EngineIncompatibleError(
            f"engine {engine.name} was built with {built}; this is {here}. Engines only run on the TensorRT "
            f"version that built them: {REBUILD_HINT}"
        )
    if sidecar.compute_capability != compute_capability and not flags.get("hardware_compatible"):
        raise EngineIncompatibleError(
            f"engine {engine.name} was built with {built}; this is {here}. Engines only run on the GPU "
            f"architecture that built them: {REBUILD_HINT}"
        )
    if sidecar.gpu_name != gpu_name:
        logger.warning("engine %s was built on %s and runs on %s: it works, but tactics were tuned for the other "
                       "GPU; rebuild for best speed", engine.name, sidecar.gpu_name, gpu_name)
    return sidecar
