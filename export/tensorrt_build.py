"""Build TensorRT engines from an ONNX export (``composekit-export tensorrt ONNX_DIR ENGINE_DIR``).

NOT RUN BY THE PROJECT YET: no machine this project was built and tested on had TensorRT (and the
lent GPU machines cannot carry it), so this module is written against TensorRT 10's Python API and
has never executed. Its tests skip with that reason where TensorRT is absent; what can be checked
without TensorRT — the profiles taken from :mod:`composekit.specs`, the sidecars and the staleness
check of :mod:`composekit.engines`, and the clear error when TensorRT is missing — is tested
everywhere.

Per component: parse the ONNX graph, set FP16 (by default), add one optimisation profile from the
spec (min/opt/max), reuse a timing cache across builds, serialise the engine to ``NAME.plan`` and
write ``NAME.plan.json`` beside it. The engine directory's ``engines.json`` lists the engines and
carries the ONNX export's manifest (dimensions, scheduler, feature extractor).
Everything is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from composekit.engines import EngineSidecar, write_sidecar
from composekit.errors import BackendUnavailableError, InputError, ModelError
from composekit.files import atomic_directory, atomic_file
from composekit.manifest import read_manifest, sha256_file
from composekit.specs import COMPONENT_NAMES, component_specs

__all__ = ["build_engines", "gpu_identity", "ENGINES"]

ENGINES = "engines.json"


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "building engines needs TensorRT (`pip install 'composekit[trt]'`) and an NVIDIA GPU; "
            "neither is needed for the ONNX Runtime backend"
        ) from exc
    return trt


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") through cuda-python, without torch."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError("reading the GPU's identity needs cuda-python (`pip install cuda-python`)") from exc
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA could not describe GPU {device} (error {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def build_engines(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fp16: bool = True,
                  timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    trt = _tensorrt()
    from composekit import __version__

    manifest = read_manifest(onnx_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another directory or pass overwrite=True")
    gpu_name, capability = gpu_identity()
    specs = component_specs(manifest.dims, dynamic_spatial=bool(manifest.data.get("dynamic_spatial")))
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    cache_path = Path(timing_cache) if timing_cache else out.parent / "composekit-timing.cache"
    cache_config = builder.create_builder_config()
    cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")

    engines: dict[str, Any] = {}
    with atomic_directory(out, overwrite) as tmp:
        for name in COMPONENT_NAMES:
            spec = specs[name]
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, log)
            onnx_path = manifest.path(name)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise ModelError(f"TensorRT could not parse {onnx_path}: {errors}")
            config = builder.create_builder_config()
            if fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            if workspace_gb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
            config.set_timing_cache(cache, ignore_mismatch=False)
            profile = builder.create_optimization_profile()
            shapes = spec.trt_profile()
            for input_name, (lo, opt, hi) in shapes.items():
                profile.set_shape(input_name, lo, opt, hi)
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise ModelError(f"TensorRT failed to build an engine for {name}; see its log above")
            engine_path = tmp / f"{name}.plan"
            engine_path.write_bytes(bytes(serialized))
            sidecar = EngineSidecar(
                component=name, engine_file=engine_path.name, engine_sha256=sha256_file(engine_path),
                source_onnx=onnx_path.name, source_onnx_sha256=manifest.component(name)["sha256"],
                tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                build_flags={"fp16": fp16, "workspace_gb": workspace_gb, "version_compatible": False,
                             "hardware_compatible": False},
                profile={k: [list(s) for s in v] for k, v in shapes.items()}, composekit_version=__version__,
            )
            write_sidecar(engine_path, sidecar)
            engines[name] = {"file": engine_path.name, "sidecar": f"{engine_path.name}.json"}
        # The ONNX manifest's runtime data (dims, scheduler, feature extractor) travels with the engines.
        data = {"onnx_manifest": manifest.data, "onnx_source": str(Path(onnx_dir).resolve()), "engines": engines}
        (tmp / ENGINES).write_text(json.dumps(data, indent=2) + "\n")
        with atomic_file(cache_path) as f:
            f.write(bytes(cache.serialize()))
    return engines
