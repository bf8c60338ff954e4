"""Export a model directory's four components to ONNX, with a manifest the runtime needs nothing beside.

    composekit-export onnx MODEL_DIR OUT_DIR [--fp16] [--dynamic-spatial] [--opset 17] [--optimize cpu|cuda]
                           [--int8] [--tiny-vae DIR] [--token-downsampling N]

For each component of :mod:`composekit.core.specs` (object encoder = CLIP + adaptor/mapper as one
graph; U-Net; VAE encoder; VAE decoder):

1. wrap the PyTorch module so its signature is the spec's (scaling factor baked into the VAE graphs);
2. export with ``torch.onnx.export`` (TorchScript exporter; batch always dynamic, spatial axes on
   request), consolidating weights into one ``NAME.onnx.data`` file when the graph is over 2 GB;
3. with ``optimize``, fuse the U-Net graph with ONNX Runtime's transformer optimizer (:func:`_fuse`);
4. run ``onnx.checker`` and compare ONNX Runtime (CPU) against PyTorch on the spec's sample inputs,
   recording the max abs error in the manifest.

Everything is written into a temporary folder beside ``OUT_DIR`` and renamed into place at the end,
so a failed export leaves no directory that would load.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from composekit.core.options import MAX_TOKEN_DOWNSAMPLING, check_choice, check_integer
from composekit.core.specs import ComponentSpec, ModelDims, component_specs
from composekit.errors import InputError
from composekit.formats.atomic import atomic_directory
from composekit.formats.export_manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    check_manifest_data,
    sha256_file,
)

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)
_TWO_GB = 2 * 1024**3 - 1024**2  # protobuf's hard limit, with a little room
DEFAULT_MAX_BATCH = 8  # composites per batch the runtimes may sample together (U-Net batch up to 16)


def _export_one(module, spec: ComponentSpec, scratch: Path, dest: Path, opset: int, float_dtype: str) -> list[dict]:
    """Export ``module`` to ``dest/spec.file``; returns the external-data files written (if any)."""
    import onnx
    import torch

    inputs = spec.sample_inputs(float_dtype)
    args = tuple(torch.from_numpy(inputs[n]) for n in spec.input_names)
    work = scratch / spec.name
    work.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape asserts in diffusers' blocks
        torch.onnx.export(module, args, str(work / spec.file), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    big = sum(f.stat().st_size for f in work.iterdir()) > _TWO_GB
    model = onnx.load(str(work / spec.file), load_external_data=True)
    external = save_graph(model, dest / spec.file, big)
    del model
    shutil.rmtree(work)
    onnx.checker.check_model(str(dest / spec.file))
    return external


def save_graph(model: Any, path: Path, big: bool) -> list[dict]:
    """Write an ONNX ``model`` to ``path``, its weights in one ``NAME.onnx.data`` file beside it when ``big``
    (over protobuf's 2 GB); returns the external-data files written, as the manifest lists them."""
    import onnx

    if not big:
        onnx.save_model(model, str(path))
        return []
    data_name = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    # onnx creates the external-data file readable by its owner only (0600); give it the graph file's mode, so
    # an export another user (a service account) can read its graphs can read their weights too.
    os.chmod(path.parent / data_name, path.stat().st_mode & 0o777)
    return [{"file": data_name}]


# ONNX Runtime's U-Net fusions that need CUDA kernels (no CPU implementation in onnxruntime 1.32).
_CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                      "enable_packed_kv", "enable_packed_qkv", "enable_bias_add")


def _patch_num_heads() -> None:
    """Work around onnxruntime's U-Net attention fusion under numpy >= 2.4.

    ``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a one-element array, which numpy 2.4 made an
    error (still present in onnxruntime 1.32). The wrapper reads the same constant with ``reshape(-1)[0]``
    when the original raises that TypeError. The optimizer imports its modules both as
    ``onnxruntime.transformers.X`` and as top-level ``X``, so both copies are patched.
    """
    import sys

    import onnxruntime.transformers.optimizer  # noqa: F401  (puts the top-level copies in sys.modules)

    for name in ("onnxruntime.transformers.fusion_attention_unet", "fusion_attention_unet"):
        module = sys.modules.get(name)
        cls = getattr(module, "FusionAttentionUnet", None)
        if cls is None or getattr(cls.get_num_heads, "_composekit_patch", False):
            continue
        original = cls.get_num_heads

        def get_num_heads(self, reshape_q, is_torch2=False, _original=original):
            try:
                return _original(self, reshape_q, is_torch2)
            except TypeError:  # numpy >= 2.4: int() of a one-element array
                parent = self.model.get_parent(reshape_q, 1)
                return int(np.asarray(self.model.get_constant_value(parent.input[2])).reshape(-1)[0])

        get_num_heads._composekit_patch = True
        cls.get_num_heads = get_num_heads


def _fuse(path: Path, scratch: Path, target: str) -> list[dict]:
    """Fuse the U-Net graph at ``path`` in place with ONNX Runtime's transformer optimizer.

    ``target="cpu"``: attention (self and cross, as Attention / MultiHeadAttention) and layer-norm
    fusions, whose kernels every execution provider has. ``"cuda"`` adds GroupNorm, SkipGroupNorm,
    BiasSplitGelu, NhwcConv, BiasAdd and packed QKV/KV, which only the CUDA provider implements (the
    graph then does not load on the CPU). Returns the external-data files written (if any).
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    _patch_num_heads()
    data = path.parent / f"{path.name}.data"
    big = data.exists() or path.stat().st_size > _TWO_GB  # fusing keeps the weights: same size class
    options = FusionOptions("unet")
    if target == "cpu":
        for flag in _CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(str(path), model_type="unet", num_heads=0, hidden_size=0,
                                         optimization_options=options, opt_level=0, use_gpu=target == "cuda")
    logger.info("fused %s for %s: %s", path.name, target, {k: v for k, v in
                model.get_fused_operator_statistics().items() if v})
    # Saved beside, then moved in: the optimizer read the graph without its external data, so the model
    # still refers to the old .data file until it is saved (which is why that file is removed only after).
    work = scratch / f"fused-{path.stem}"
    work.mkdir()
    model.save_model_to_file(str(work / path.name), use_external_data_format=big, all_tensors_to_one_file=True)
    del model
    if data.exists():
        data.unlink()
    for f in work.iterdir():
        os.replace(f, path.parent / f.name)
    shutil.rmtree(work)
    return [{"file": data.name}] if data.exists() else []


def _check_one(module, spec: ComponentSpec, path: Path, float_dtype: str) -> float:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch on the spec's sample inputs."""
    import onnxruntime as ort
    import torch

    inputs = spec.sample_inputs(float_dtype, batch=2 if spec.name.startswith("unet") else 1, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)
    def as_ref(a: np.ndarray):
        t = torch.from_numpy(a)
        return t if a.dtype == np.int64 else t.float()  # the reference runs in fp32

    with torch.no_grad():
        ref = module(*(as_ref(inputs[n]) for n in spec.input_names))
    ref = ref if isinstance(ref, tuple) else (ref,)
    return max(float(np.abs(g.astype(np.float32) - r.float().numpy()).max()) for g, r in zip(got, ref))


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    dynamic_spatial: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    opset: int = 17,
    check: bool = True,
    overwrite: bool = False,
    optimize: str | None = None,
    tiny_vae: str | os.PathLike | None = None,
    int8: bool = False,
    token_downsampling: int = 1,
) -> dict[str, Any]:
    """Export ``model_dir`` (a diffusers-layout model directory) to ``out_dir``; returns the manifest.

    ``optimize``: None (plain graphs: every runtime, OpenVINO included), ``"cpu"`` (ONNX Runtime's
    attention and layer-norm fusions in the U-Net; ONNX Runtime only) or ``"cuda"`` (all U-Net fusions;
    ONNX Runtime's CUDA provider only, so its check against torch is skipped on machines without it).
    ``tiny_vae``: a diffusers ``AutoencoderTiny`` folder or Hub id (e.g. TAESD) whose decoder is exported
    as the optional ``tiny_vae_decoder`` (used with ``from_pretrained(export, vae="tiny")``).
    ``int8``: quantize the U-Net graphs to int8 with NNCF, calibrated on inputs captured from composekit's
    own sampler (see :mod:`composekit_export.quantize`); fp32 only, not with ``optimize``.
    ``token_downsampling``: 2..4 traces the U-Net graphs with the highest-resolution self-attentions taking
    their keys and values from every N-th latent cell (see :mod:`composekit.backends.token_downsampling`; a
    speed/quality trade, recorded in the manifest); 1 (default) = the model as it is. Not with
    ``dynamic_spatial`` (the token grid is fixed at trace time).
    """
    import diffusers
    import onnx
    import torch
    import transformers

    from composekit import __version__
    from composekit.backends.torch_backend import load as load_torch
    from composekit.formats.model_source import read_model_dir

    check_choice("precision", precision, ("fp32", "fp16"))
    check_choice("optimize", optimize, ("cpu", "cuda"), nullable=True)
    if int8 and (precision != "fp32" or optimize):
        raise InputError("--int8 quantizes fp32 graphs for runtimes that run QDQ graphs (OpenVINO, TensorRT, ONNX "
                         "Runtime); it does not combine with --fp16 or --optimize")
    token_downsampling = check_integer("token_downsampling", token_downsampling, 1, MAX_TOKEN_DOWNSAMPLING)
    if token_downsampling > 1 and dynamic_spatial:
        raise InputError("--token-downsampling fixes the U-Net's token grid at the model's size; it does not combine "
                         "with --dynamic-spatial")
    if int8:
        from composekit_export.quantize import require_nncf

        require_nncf()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another directory or pass overwrite=True")
    files = read_model_dir(Path(model_dir))
    # fp16 graphs are traced from fp16 modules (CPU kernels suffice for tracing).
    vae_dir = None
    if tiny_vae is not None:
        from composekit.formats.model_source import TINY_VAE_ALLOW_PATTERNS, resolve_source

        vae_dir = resolve_source(tiny_vae, allow_patterns=TINY_VAE_ALLOW_PATTERNS)
    backend = load_torch(files, device="cpu", dtype="float16" if precision == "fp16" else "float32",
                         vae=vae_dir, token_downsampling=token_downsampling)
    float_dtype = "float16" if precision == "fp16" else "float32"
    info = backend.info
    with torch.no_grad():
        probe, _ = backend.encode_object(np.zeros((1, 3, 224, 224), np.float32))
    dims = ModelDims(model_size=info.model_size, vae_scale_factor=info.vae_scale_factor,
                     latent_channels=info.latent_channels, unet_in_channels=info.unet_in_channels,
                     context_tokens=int(probe.shape[1]), context_dim=int(probe.shape[2]),
                     feature_channels=info.feature_channels)
    check_integer("max_batch", max_batch, 1, 256)
    specs = component_specs(dims, dynamic_spatial=dynamic_spatial, max_batch=max_batch)
    graphs = backend.components  # the torch backend's own module per component spec
    # traced with cross-attention to a one-token context as a broadcast (composekit.backends.single_token_attention)
    single_token = dims.context_tokens == 1 and backend.single_token_attention > 0
    calibration = None
    if int8:
        from composekit_export.quantize import capture_calibration, quantize_graph, quantize_openvino

        start = time.perf_counter()
        calibration = capture_calibration(backend)
        logger.info("int8: captured %d U-Net calibration inputs in %.0f s", len(calibration["unet"]),
                    time.perf_counter() - start)
    quantized: dict[str, Any] = {}

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".scratch.", dir=out.parent))
    components: dict[str, Any] = {}
    try:
        with atomic_directory(out, overwrite) as tmp:
            for name in graphs:
                spec = specs[name]
                start = time.perf_counter()
                external = _export_one(graphs[name], spec, scratch, tmp, opset, float_dtype)
                if optimize and name == "unet":
                    external = _fuse(tmp / spec.file, scratch, optimize)
                seconds = time.perf_counter() - start
                error = None
                if check and optimize == "cuda" and name == "unet":
                    logger.warning("unet: not checked against torch (the CUDA fusions need onnxruntime's CUDA "
                                   "provider)")
                elif check:
                    # The reference is fp32 from the same weights, so for fp16 the error includes fp16 rounding.
                    reference = _fp32_copy(graphs[name]) if precision == "fp16" else graphs[name]
                    error = _check_one(reference, spec, tmp / spec.file, float_dtype)
                    logger.info("%s: max |onnxruntime - torch| = %.3g", name, error)
                components[name] = _entry(tmp, spec, external, float_dtype, error, seconds)
            if calibration is not None:
                # The torch modules are not needed any more: free their memory for NNCF (a full-size U-Net is
                # 3.4 GB in the graph, the session and the statistics each).
                del backend, graphs
                gc.collect()
                for name in ("unet", "unet_shallow"):
                    if name not in components:
                        continue
                    spec, start = specs[name], time.perf_counter()
                    # The OpenVINO IR first: it is quantized from the float graph the QDQ graph then replaces.
                    ir = quantize_openvino(tmp / spec.file, spec, calibration[name])
                    error_ir = _check_openvino(tmp / ir["file"], calibration[name], calibration["outputs"]) \
                        if check else None
                    logger.info("%s (int8, OpenVINO IR): max |openvino - torch fp32| = %.3g on %s calibration "
                                "inputs", name, error_ir or float("nan"), CHECKED_INPUTS)
                    quantized[name] = quantize_graph(tmp / spec.file, spec, calibration[name], scratch,
                                                     big=bool(components[name]["external_data"]))
                    quantized[name].update(openvino=ir["openvino"])
                    seconds = components[name]["export_seconds"] + time.perf_counter() - start
                    data = tmp / f"{spec.file}.data"
                    error = _check_against(tmp / spec.file, calibration[name], calibration["outputs"]) if check \
                        else None
                    logger.info("%s (int8): max |onnxruntime - torch fp32| = %.3g on %s calibration inputs", name,
                                error or float("nan"), CHECKED_INPUTS)
                    components[name] = _entry(tmp, spec, [{"file": data.name}] if data.exists() else [], float_dtype,
                                              error, seconds)
                    components[name]["openvino"] = _ir_entry(tmp, ir, error_ir)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "composekit_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model": str(Path(model_dir).resolve()), "family": files.family,
                           "class_name": files.index.get("_class_name")},
                "dims": dims.to_dict(),
                "precision": precision,
                "opset": opset,
                "dynamic_spatial": dynamic_spatial,
                "max_batch": max_batch,
                "optimized": optimize,
                "scheduler": files.configs["scheduler"],
                "feature_extractor": files.configs["feature_extractor"],
                "cutout_backdrop": files.index.get("cutout_backdrop", [255, 255, 255]),
                "tiny_vae": None if vae_dir is None else str(tiny_vae),
                "int8": quantized or None,
                "token_downsampling": token_downsampling,
                "single_token_cross_attention": single_token,  # false for multi-token contexts and older exports
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__,
                             **({key: next(iter(quantized.values()))[key] for key in ("nncf", "openvino")}
                                if quantized else {})},
                "components": components,
            }
            # The writer and the readers share one schema: what is written here must read back.
            check_manifest_data(manifest, str(tmp / MANIFEST), "this is a bug in the exporter; please report it")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


CHECKED_INPUTS = 3  # calibration inputs an int8 graph is compared with torch on (their recorded fp32 outputs)


def _check_against(path: Path, samples: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> float:
    """Max abs difference between ONNX Runtime (CPU) on ``samples`` and torch's recorded outputs for them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _max_error(lambda inputs: session.run(["noise_pred"], inputs)[0], samples, outputs)


def _check_openvino(xml: Path, samples: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> float:
    """Max abs difference between OpenVINO (CPU, f32) on ``samples`` and torch's recorded outputs for them."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return _max_error(lambda inputs: compiled(inputs)[0], samples, outputs)


def _max_error(run: Any, samples: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> float:
    """Max abs difference between ``run(inputs)`` and the recorded output on CHECKED_INPUTS samples spread over
    the calibration set."""
    picked = np.linspace(0, len(samples) - 1, min(CHECKED_INPUTS, len(samples))).astype(int)
    return max(float(np.abs(run(samples[i]) - outputs[i]).max()) for i in picked)


def _file_item(root: Path, name: str) -> dict[str, Any]:
    """A file of the export as the manifest lists it: name, sha256, bytes."""
    return {"file": name, "sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}


def _ir_entry(root: Path, ir: dict[str, Any], error: float | None) -> dict[str, Any]:
    """The manifest entry of a component's OpenVINO IR: the ``.xml`` and its ``.bin`` weights with sha256."""
    return {**_file_item(root, ir["file"]), "external_data": [_file_item(root, ir["weights"])],
            "max_abs_error_vs_torch": error}


def _entry(root: Path, spec: ComponentSpec, external: list[dict], float_dtype: str, error: float | None,
           seconds: float) -> dict[str, Any]:
    """A component's manifest entry: its files (sha256, bytes), inputs and outputs, error, export time."""
    return {
        **_file_item(root, spec.file),
        "external_data": [_file_item(root, item["file"]) for item in external],
        "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": "int64" if t.dtype == "int64" else float_dtype}
                   for t in spec.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": float_dtype} for t in spec.outputs],
        "max_abs_error_vs_torch": error,
        "export_seconds": round(seconds, 2),
    }


def _fp32_copy(module):
    import copy

    return copy.deepcopy(module).float()
