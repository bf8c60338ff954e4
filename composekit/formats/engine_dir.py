"""TensorRT engine sidecars: what an engine was built with, and whether this machine may run it.

Every engine file ``NAME.plan`` has a sidecar ``NAME.plan.json`` written beside it (the engine's
bytes are never modified or prefixed): the component, the engine's sha256, the source ONNX file and
its sha256, the TensorRT version, the GPU name and compute capability, the build flags and the
optimisation profile. :func:`check_engine` refuses an engine whose bytes do not match its sidecar
(``ModelError``) or that was built for another TensorRT or GPU architecture
(``EngineIncompatibleError``, saying how to rebuild). Pure Python: no TensorRT import.

An engine directory holds the engines, their sidecars and ``engines.json``, which lists them and
carries the ONNX export's manifest data (dimensions, scheduler, feature extractor), so the engines
load without the ONNX files. :func:`read_engine_dir` reads it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from composekit.errors import BackendUnavailableError, EngineIncompatibleError, ModelError, install_hint
from composekit.formats.atomic import atomic_file
from composekit.formats.export_manifest import ExportManifest, check_manifest_data, load_order, sha256_file
from composekit.formats.safe_json import SCHEMAS, check, inside, read_json, regular_file

__all__ = ["EngineSidecar", "sidecar_path", "write_sidecar", "read_sidecar", "check_engine", "REBUILD_HINT",
           "ENGINES", "EngineDir", "read_engine_dir", "gpu_identity"]

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "composekit-trt-engine"
ENGINES = "engines.json"
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
    check(data, SCHEMAS["sidecar"], str(path), REBUILD_HINT)
    try:
        return EngineSidecar(**{k: data[k] for k in EngineSidecar.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise ModelError(f"sidecar {path} lacks fields ({exc}); {REBUILD_HINT}") from None


def check_engine(engine: str | os.PathLike, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                 verify_hash: bool = True) -> EngineSidecar:
    """Refuse an engine this runtime must not load; return its sidecar when it may be loaded."""
    engine = Path(engine)
    sidecar = read_sidecar(engine)
    try:
        regular_file(engine, "engine")
    except FileNotFoundError:
        raise ModelError(f"engine {engine} is missing; {REBUILD_HINT}") from None
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


@dataclass(frozen=True)
class EngineDir:
    """A TensorRT engine directory: its engines and the ONNX export's manifest data they came from."""

    root: Path
    data: dict[str, Any]

    @property
    def manifest(self) -> ExportManifest:
        """The source export's manifest (dims, precision, scheduler, ...); its ONNX files are not needed."""
        return ExportManifest(self.root, dict(self.data["onnx_manifest"]))

    def path(self, component: str) -> Path:
        name = self.data["engines"][component]["file"]
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ModelError(f"{self.root / ENGINES}: engine file {name!r} must be a plain file name; {REBUILD_HINT}")
        path = inside(self.root, name, "engine")
        inside(self.root, sidecar_path(name).name, "engine sidecar")  # the sidecar may not lead out either
        return path


def engine_components(manifest: ExportManifest) -> tuple[str, ...]:
    """The components an engine directory holds: the four, and the shallow U-Net (feature caching) when the
    export has it (the decoder last, as the runtimes expect)."""
    return load_order(manifest, ("vae_decoder",))


def read_engine_dir(root: str | os.PathLike) -> EngineDir:
    """Parse ``root/engines.json``; every component must have an engine entry."""
    root = Path(root)
    data = read_json(root / ENGINES, fix=REBUILD_HINT, schema=SCHEMAS["engines"],
                     missing=f"{root} has no {ENGINES}; it is not a composekit engine directory ({REBUILD_HINT})")
    check_manifest_data(data["onnx_manifest"], f"{root / ENGINES} (onnx_manifest)", REBUILD_HINT)
    missing = [c for c in engine_components(ExportManifest(root, data["onnx_manifest"])) if c not in data["engines"]]
    if missing:
        raise ModelError(f"{root / ENGINES} lists no engine for {missing}; {REBUILD_HINT}")
    return EngineDir(root, data)


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") through cuda-python, without torch."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError(
                f"reading the GPU's identity needs cuda-python; {install_hint('trt')}") from exc
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA could not describe GPU {device} (error {err}); is a GPU visible?")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"
