"""OpenVINO backend: runs an exported model (``composekit-export onnx``) with OpenVINO, without PyTorch.

It reads the same export directory as the ONNX Runtime backend, with the same checks (manifest and
sha256 of every file, external data inside the directory, graph inputs and outputs against the spec).
In an ``--int8`` export it reads the U-Net graphs from the OpenVINO IRs NNCF quantized for OpenVINO
(``unet.int8.xml``), not from the QDQ ONNX graphs that ONNX Runtime and TensorRT read.

How it runs:

1. Each graph is read once and compiled for **static shapes**: the export's fixed window, and one
   batch size per compiled copy — at load, the U-Net (and its shallow pass, for feature caching) at
   batch 2 (classifier-free guidance) and batch 1 (after the guidance cut-off) and the encoders and decoder at batch 1; other batch sizes
   (``paste_batch``) are compiled the first time they are needed.
2. Precision: ``precision="bf16"`` computes in bfloat16 on CPUs that have it (AVX-512 BF16 / AMX),
   ``"f32"`` in float32, ``"f16"`` in float16 where the device reports it; the default is bf16 where
   the CPU supports it (and ``ONEDNN_MAX_CPU_ISA``, if set, does not cap OpenVINO's kernels below it),
   else f32. The sampler's arithmetic stays in float32 either way.
3. Compiled models are cached in ``cache_dir`` (default: composekit's folder in the user cache,
   ``~/.cache/composekit/openvino``; ``cache_dir=False`` turns it off), so a second load of the
   same export skips compilation.
4. Each thread gets its own infer request per compiled model, so one backend serves concurrent callers.
5. ``decode="region"``: the decoders are compiled again for a region's latent size when one is asked for
   (well under a second for the full-size VAE decoder; the last few sizes are kept, none is written to the
   compiled-model cache, so the cache does not grow with every box size).

Devices: ``"cpu"`` (default), and ``"gpu"``/``"gpu.N"``/``"npu"`` where OpenVINO reports an Intel GPU
or NPU. CUDA devices are not OpenVINO's: use ``backend="onnxruntime"``/``"tensorrt"`` there.
NOT RUN BY THE PROJECT: Intel GPU and NPU devices (none here).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from composekit.backends.arrays import ArrayModule
from composekit.backends.graph import GraphBackend, check_export_dtype, graph_components
from composekit.core.devices import parse_device
from composekit.core.options import THREADS
from composekit.core.specs import COMPONENT_NAMES
from composekit.errors import BackendUnavailableError, InputError, ModelError, install_hint
from composekit.formats.export_manifest import ExportManifest

__all__ = ["OpenVINOBackend", "load", "cache_usage", "clear_cache", "default_cache_dir", "default_precision",
           "graph_path", "isa_cap_allows_bf16", "read_graph"]

logger = logging.getLogger(__name__)

PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}  # composekit's names -> OpenVINO's hint values
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}  # OPTIMIZATION_CAPABILITIES that allow each
_OV_TYPES = {"f32": "float32", "f16": "float16", "i64": "int64"}


def default_cache_dir() -> Path:
    """Where compiled models are cached: ``$COMPOSEKIT_CACHE`` or ``$XDG_CACHE_HOME/composekit`` (``~/.cache``)."""
    base = os.environ.get("COMPOSEKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "composekit"
    return Path(base) / "openvino"


def _cache_blobs(cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, list[Path]]]:
    """The cache folder and, per device-precision subfolder (``cpu-bf16``...), the compiled models OpenVINO wrote
    there (``*.blob``); nothing else in the folder counts as the cache's."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the OpenVINO cache folder {folder} is a file, not a folder; pass the folder given as "
                         "cache_dir (default: COMPOSEKIT_CACHE/openvino or ~/.cache/composekit/openvino)")
    if not folder.is_dir():
        return folder, {}
    return folder, {sub.name: sorted(p for p in sub.glob("*.blob") if p.is_file())
                    for sub in sorted(folder.iterdir()) if sub.is_dir()}


def cache_usage(cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, tuple[int, int]]]:
    """The compiled-model cache folder (``cache_dir``, default :func:`default_cache_dir`) and, per
    device-precision subfolder, (compiled models, bytes). OpenVINO never removes entries itself: a model
    compiled again after a new export, another precision or another OpenVINO version adds entries beside the
    old ones, so the folder only grows."""
    folder, blobs = _cache_blobs(cache_dir)
    return folder, {name: (len(files), sum(f.stat().st_size for f in files)) for name, files in blobs.items()}


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Remove the compiled models cached in ``cache_dir`` (default :func:`default_cache_dir`): OpenVINO's
    ``*.blob`` files in its device-precision subfolders, nothing else. Returns (files, bytes) removed. Safe
    while a process runs from the cache: a loaded model does not read its entry again, and the next load
    compiles and caches it anew."""
    removed = freed = 0
    for files in _cache_blobs(cache_dir)[1].values():
        for f in files:
            try:
                size = f.stat().st_size
                f.unlink()
            except FileNotFoundError:  # removed meanwhile (another clear)
                continue
            removed, freed = removed + 1, freed + size
    return removed, freed


def _io(ports: Any) -> list[tuple[str, str, list]]:
    """(name, dtype, shape) of a model's inputs or outputs, as :func:`check_graph_io` takes them."""
    out = []
    for port in ports:
        kind = port.get_element_type().get_type_name()
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        out.append((port.get_any_name(), _OV_TYPES.get(kind, kind), shape))
    return out


def graph_path(manifest: ExportManifest, name: str) -> Path:
    """The file OpenVINO reads for component ``name``: the OpenVINO IR an ``--int8`` export holds beside the
    ONNX graph, else the ONNX graph."""
    return manifest.openvino_path(name) or manifest.path(name)


def read_graph(core: Any, manifest: ExportManifest, name: str, path: Path) -> Any:
    """Component ``name``'s graph at ``path`` (:func:`graph_path`), read by OpenVINO (an IR with its weights)."""
    if path.suffix != ".xml":
        return core.read_model(str(path))
    weights = manifest.openvino_weights(name)
    return core.read_model(str(path), str(weights) if weights else "")


def isa_cap_allows_bf16(cap: str | None) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (``cap``; None or empty: not set) lets OpenVINO's CPU kernels use bfloat16.
    OpenVINO reports BF16 from the CPU itself even when the cap keeps its kernels below it (AVX2, AVX512_CORE...),
    and its bf16 graphs then fail to compile; names this function does not know count as no bf16 (f32 runs)."""
    isa = (cap or "").strip().upper()
    return isa in ("", "ALL", "DEFAULT") or "AMX" in isa or \
        isa.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10"))


def default_precision(capabilities: set[str], isa_cap: str | None = None) -> str:
    """bf16 where the device reports it (and ``isa_cap``, the CPU's ``ONEDNN_MAX_CPU_ISA``, allows it), else f32."""
    return "bf16" if "BF16" in capabilities and isa_cap_allows_bf16(isa_cap) else "f32"


class OpenVINOBackend(GraphBackend):
    name = "openvino"
    region_decoders = 4  # decoders compiled for region sizes (decode="region") kept, least recently used out

    def __init__(self, manifest: ExportManifest, core: Any, device: str, config: dict[str, Any],
                 components: tuple[str, ...] = COMPONENT_NAMES) -> None:
        self.core, self.device, self.config = core, device, config
        self.arrays = ArrayModule("cpu")  # OpenVINO's inputs and outputs are host arrays
        self.models = self._open_export(manifest, components, lambda name, path: read_graph(core, manifest, name, path),
                                        lambda model: (_io(model.inputs), _io(model.outputs)), "OpenVINO",
                                        path_of=lambda name: graph_path(manifest, name))
        # OpenVINO reshapes the decoders to any latent size: decode="region" decodes the hole's cells only
        self.card = replace(self.card, info=replace(self.card.info, any_size_decode=True))
        self.info = self.card.info
        self.compiled: dict[tuple[str, int], Any] = {}
        self._regions: OrderedDict[tuple[str, int, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        unets = ("unet", "unet_shallow") if "unet_shallow" in self.models else ("unet",)
        for name, batch in (("object_encoder", 1), ("vae_encoder", 1), *((u, b) for u in unets for b in (2, 1)),
                            (self.decoder, 1)):
            self._compiled(name, batch)

    def describe(self) -> str:
        ir = " (OpenVINO IR)" if any(self.manifest.openvino_path(n) for n in self.models) else ""
        return f"OpenVINO {self.device}, {self.config.get('INFERENCE_PRECISION_HINT', 'f32')}{self._export_notes(ir)}"

    def _compiled(self, name: str, batch: int) -> Any:
        """The model compiled for batch ``batch`` with the spec's fixed sizes (compiled once, then kept)."""
        key = (name, batch)
        with self._lock:
            if key not in self.compiled:
                low, _, high = self.specs[name].ranges.get("B", (1, 1, 1))
                if not low <= batch <= high:
                    raise InputError(f"{name}: batch {batch} is outside this export's range {low}..{high} "
                                     f"(max_batch {self.info.max_batch}); use a smaller batch_size")
                shapes = {t.name: [batch if d == "B" else self._dim(d) for d in t.shape]
                          for t in self.specs[name].inputs}
                self.compiled[key] = self._compile(name, shapes, self.config, f"at batch {batch}")
                logger.info("compiled %s for batch %d on %s", name, batch, self.device)
            return self.compiled[key]

    def decode(self, latents: Any, tiny: bool = False) -> Any:
        side = self.info.model_size // self.info.vae_scale_factor
        if tuple(latents.shape[2:]) == (side, side):
            return super().decode(latents, tiny)
        name = self.fast_decoder if tiny else self.decoder
        request = self._region_compiled(name, *latents.shape[:1], *latents.shape[2:]).create_infer_request()
        return self._infer(request, name, {"latent": latents})[0]

    def _region_compiled(self, name: str, batch: int, height: int, width: int) -> Any:
        """Decoder ``name`` compiled for latents of ``height`` x ``width`` cells (``decode="region"``): compiled
        on first use without the on-disk cache, the last :attr:`region_decoders` sizes kept."""
        key = (name, batch, height, width)
        with self._lock:
            if key in self._regions:
                self._regions.move_to_end(key)
                return self._regions[key]
            compiled = self._compile(name, {"latent": [batch, self.info.latent_channels, height, width]},
                                     {k: v for k, v in self.config.items() if k != "CACHE_DIR"},
                                     f"for a {height} x {width}-cell region", "; use decode='window'")
            logger.info("compiled %s for %d x %d latent cells (decode='region') on %s", name, height, width,
                        self.device)
            self._regions[key] = compiled
            while len(self._regions) > self.region_decoders:
                self._regions.popitem(last=False)
            return compiled

    def _compile(self, name: str, shapes: dict[str, list[int]], config: dict[str, Any], what: str,
                 fix: str = "") -> Any:
        """Graph ``name`` reshaped to ``shapes`` and compiled with ``config`` (``what``/``fix``: for the error)."""
        model = self.models[name].clone()
        model.reshape(shapes)
        try:
            return self.core.compile_model(model, self.device, config)
        except Exception as exc:
            raise ModelError(f"OpenVINO could not compile the {name} for {self.device} {what}: {exc}{fix}") from exc

    def _dim(self, d: Any) -> int:
        if isinstance(d, int):
            return d
        raise ModelError(f"the export's spec leaves dimension {d!r} open; only the batch may be open. Re-export")

    def _request(self, name: str, batch: int) -> Any:
        requests = self._local.__dict__.setdefault("requests", {})
        key = (name, batch)
        if key not in requests:
            requests[key] = self._compiled(name, batch).create_infer_request()
        return requests[key]

    def _run(self, name: str, inputs: dict[str, Any]) -> list[Any]:
        return self._infer(self._request(name, int(next(iter(inputs.values())).shape[0])), name, inputs)

    def _infer(self, request: Any, name: str, inputs: dict[str, Any]) -> list[Any]:
        """Run graph ``name``'s infer request on ``inputs`` (floats in the export's precision); its outputs as
        float32 copies."""
        feeds = {k: (v if v.dtype == np.int64 else np.ascontiguousarray(v, dtype=self.float))
                 for k, v in inputs.items()}
        request.infer(feeds)
        return [np.array(request.get_tensor(k).data, dtype=np.float32) for k in self.specs[name].output_names]


def _device(core: Any, device: Any) -> str:
    """composekit's device string -> OpenVINO's device name, checked against what OpenVINO reports."""
    parsed = parse_device("cpu" if device is None else device, backend="openvino", allowed=("cpu", "gpu", "npu"))
    name = parsed.kind.upper() + ("" if parsed.index is None else f".{parsed.index}")
    available = list(core.available_devices)
    if name not in available and not (parsed.index is None and any(d.startswith(name) for d in available)):
        raise BackendUnavailableError(f"device {device!r} is not available to OpenVINO here (available: "
                                      f"{[d.lower() for d in available]}); use device='cpu'")
    return name


def load(content: ExportManifest, *, device: Any = None, dtype: Any = None, precision: str | None = None,
         threads: int | None = None, cache_dir: str | os.PathLike | bool | None = None,
         vae: str | None = None, local_files_only: bool = False) -> OpenVINOBackend:
    """Open an export (read by :func:`composekit.formats.export_manifest.read_manifest`) with OpenVINO.

    ``precision``: ``"f32"``, ``"bf16"`` or ``"f16"`` (inference precision; None = bf16 where the device
    supports it, else f32). ``dtype`` must be None or the export's precision (fixed at export).
    ``threads``: OpenVINO's inference threads (None = its default, all cores). ``cache_dir``: where
    compiled models are cached (None = :func:`default_cache_dir`, False = no cache). ``vae="tiny"``:
    decode with the export's tiny decoder (``--tiny-vae``).
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailableError(f"the openvino backend needs OpenVINO; {install_hint('openvino')}") from exc
    manifest = content
    model_dir = manifest.root
    if manifest.optimized:
        raise ModelError(f"{model_dir} was exported with --optimize {manifest.optimized}: its U-Net uses ONNX Runtime's "
                         "own fused operators, which OpenVINO cannot run. Load it with backend='onnxruntime', or "
                         "export without --optimize for OpenVINO")
    components = graph_components(manifest, vae)
    check_export_dtype(manifest, dtype, "pass dtype=None (for OpenVINO's compute precision use "
                       "precision='f32'|'bf16')")
    core = ov.Core()
    name = _device(core, device)
    capabilities = set(core.get_property(name, "OPTIMIZATION_CAPABILITIES"))
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if name == "CPU" else None  # caps the CPU's kernels only
    if precision is None:
        precision = default_precision(capabilities, isa_cap)
        logger.info("precision=None: OpenVINO computes in %s on %s%s", precision, name,
                    f" (ONEDNN_MAX_CPU_ISA={isa_cap})" if isa_cap else "")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if _CAPABILITY[precision] not in capabilities:
        raise BackendUnavailableError(f"precision {precision!r} is not supported by OpenVINO's {name} here "
                                      f"(it reports {sorted(capabilities)}); use precision='f32'")
    if precision == "bf16" and not isa_cap_allows_bf16(isa_cap):
        raise BackendUnavailableError(f"precision 'bf16' cannot run on the CPU here: ONEDNN_MAX_CPU_ISA={isa_cap} keeps "
                                      "OpenVINO's kernels below bfloat16; unset it or use precision='f32'")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if THREADS.check(threads) is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not False:
        if cache_dir is True:
            cache_dir = None
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        try:
            (folder / f"{name.lower()}-{precision}").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the OpenVINO cache folder {folder}: {exc.strerror or exc}; pass "
                             "cache_dir=<a writable folder> or cache_dir=False") from None
        # One folder per device and precision: OpenVINO 2026.4 was seen loading a blob compiled for f32
        # when bf16 was asked for (NaN results), so the cache key must not rely on the config alone.
        config["CACHE_DIR"] = str(folder / f"{name.lower()}-{precision}")
    return OpenVINOBackend(manifest, core, name, config, components)
