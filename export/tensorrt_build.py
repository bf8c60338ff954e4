"""Build TensorRT engines from an ONNX export (``composekit-export tensorrt ONNX_DIR ENGINE_DIR``).

NOT RUN BY THE PROJECT: no machine this project was built and tested on had TensorRT (the lent GPU
machines have no TensorRT and cannot carry it), so :func:`build_engines` is written against
TensorRT 10's Python API and has never executed. What it shares with the runtime is tested
everywhere: :func:`write_engine_dir` (the directory, sidecars and ``engines.json``; the tests drive it
with a stand-in compiler), the profiles from :mod:`composekit.core.specs`, the staleness check of
:mod:`composekit.formats.engine_dir`, and the clear error when TensorRT is missing.

Per component: parse the ONNX graph into a strongly typed network — the engine's precision is the
export's (``composekit-export onnx --fp16`` for fp16 engines): TensorRT 11 removed the weakly typed
``BuilderFlag.FP16`` route, and TensorRT 10 takes the same strongly typed path through
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` — add one optimisation profile from the spec (min/opt/max), reuse a timing cache across builds, serialise the engine to ``NAME.plan`` and
write ``NAME.plan.json`` beside it (the engine's bytes are never modified or prefixed). The engine
directory's ``engines.json`` lists the engines and carries the ONNX export's manifest data
(dimensions, scheduler, feature extractor), so the runtime needs nothing else. Everything is
written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from composekit.core.specs import ComponentSpec
from composekit.errors import BackendUnavailableError, InputError, ModelError, install_hint
from composekit.formats.atomic import atomic_directory, atomic_file
from composekit.formats.engine_dir import ENGINES, EngineSidecar, engine_components, gpu_identity, write_sidecar
from composekit.formats.export_manifest import read_manifest, sha256_file

__all__ = ["build_engines", "write_engine_dir", "ENGINES"]

# (component name, its ONNX file, its spec) -> serialised engine bytes
Compile = Callable[[str, Path, ComponentSpec], bytes]


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"building engines needs TensorRT ({install_hint('trt')}) and an NVIDIA GPU; "
            "neither is needed for the ONNX Runtime backend"
        ) from exc
    return trt


def write_engine_dir(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, compile_engine: Compile, *,
                     tensorrt_version: str, gpu_name: str, compute_capability: str, build_flags: dict[str, Any],
                     overwrite: bool = False) -> dict[str, Any]:
    """Compile every component of the export in ``onnx_dir`` and write the engine directory atomically.

    Each sidecar's build flags also record the export's precision: networks are strongly typed, so it
    is the engine's precision.
    """
    from composekit import __version__

    manifest = read_manifest(onnx_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another directory or pass overwrite=True")
    specs = manifest.specs()
    engines: dict[str, Any] = {}
    with atomic_directory(out, overwrite) as tmp:
        for name in engine_components(manifest):
            spec, onnx_path = specs[name], manifest.path(name)
            engine_path = tmp / f"{name}.plan"
            engine_path.write_bytes(compile_engine(name, onnx_path, spec))
            write_sidecar(engine_path, EngineSidecar(
                component=name, engine_file=engine_path.name, engine_sha256=sha256_file(engine_path),
                source_onnx=onnx_path.name, source_onnx_sha256=manifest.component(name)["sha256"],
                tensorrt_version=tensorrt_version, gpu_name=gpu_name, compute_capability=compute_capability,
                build_flags={"precision": manifest.precision, **build_flags}, composekit_version=__version__,
                profile={k: [list(s) for s in v] for k, v in spec.trt_profile().items()},
            ))
            engines[name] = {"file": engine_path.name, "sidecar": f"{engine_path.name}.json"}
        data = {"onnx_manifest": manifest.data, "onnx_source": str(Path(onnx_dir).resolve()), "engines": engines}
        (tmp / ENGINES).write_text(json.dumps(data, indent=2) + "\n")
    return engines


def _network_flags(trt) -> int:
    """Strongly typed networks: the only kind in TensorRT 11, opted into with a flag in TensorRT 10."""
    major = int(str(trt.__version__).split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major >= 11 or flag is None:
        return 0
    return 1 << int(flag)


def build_engines(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Build one engine per component with TensorRT (never run by the project; see the module note)."""
    trt = _tensorrt()
    gpu_name, capability = gpu_identity()
    out = Path(out_dir)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    cache_path = Path(timing_cache) if timing_cache else out.parent / "composekit-timing.cache"
    cache = builder.create_builder_config().create_timing_cache(
        cache_path.read_bytes() if cache_path.is_file() else b"")

    def compile_engine(name: str, onnx_path: Path, spec: ComponentSpec) -> bytes:
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, log)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in spec.trt_profile().items():
            profile.set_shape(input_name, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(f"TensorRT failed to build an engine for {name}; see its log above")
        return bytes(serialized)

    engines = write_engine_dir(
        onnx_dir, out, compile_engine, tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=capability, overwrite=overwrite,
        build_flags={"strongly_typed": True, "workspace_gb": workspace_gb,
                     "version_compatible": False, "hardware_compatible": False})
    with atomic_file(cache_path) as f:  # reused by the next build on this GPU
        f.write(bytes(cache.serialize()))
    return engines
