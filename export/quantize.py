"""int8 U-Net graphs (``composekit-export onnx ... --int8``): NNCF post-training quantization, calibrated on
inputs captured from composekit's own sampler.

1. **Calibration inputs**: the torch backend being exported pastes the demo's object into the demo's
   background (:func:`composekit.apps.demo.demo_images`) at a few boxes and seeds, and every U-Net call of
   those samplings is recorded — the noisy latents, masked-background latents and masks, timesteps and
   object contexts the exported U-Net will really see (guided, batch 2), with the deep features of each
   pass for the shallow graph (feature caching).
2. **Quantization, twice, with the same settings** (8-bit activations and weights, preset MIXED:
   symmetric weights, asymmetric activations; model type TRANSFORMER, which keeps attention's softmax
   inputs in float):

   - ``nncf.quantize`` on the exported ONNX graph, weights folded into int8 initializers: a **QDQ ONNX
     graph** that replaces the float one (inputs and outputs stay float32), for ONNX Runtime and TensorRT
     (an explicitly quantized network; not built here);
   - ``nncf.quantize`` on the same float graph read by OpenVINO: an **OpenVINO IR** (``NAME.int8.xml`` and
     ``.bin``) beside it, which the OpenVINO backend loads instead of the ONNX graph. NNCF's OpenVINO
     backend places its quantizers for OpenVINO's own kernels (and applies SmoothQuant): on the full-size
     model its noise prediction was 5x closer to f32's than the QDQ graph's in OpenVINO, and faster
     (docs/benchmarks.md).

Only the U-Net graphs are quantized (they are where the time goes); the encoders and decoders stay float.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from composekit.core.specs import ComponentSpec
from composekit.errors import BackendUnavailableError, install_hint

__all__ = ["capture_calibration", "quantize_graph", "quantize_openvino", "require_nncf", "CALIBRATION_PASTES",
           "CALIBRATION_STEPS"]

logger = logging.getLogger(__name__)

CALIBRATION_PASTES = 3  # pastes of the demo images (each box and seed its own)
CALIBRATION_STEPS = 6  # DDIM steps per paste: 18 U-Net inputs, spread over the whole schedule
# Weights quantized to 7 bits: CPUs without VNNI (AVX2 only, AVX-512 without VNNI) multiply u8 x s8 pairs into
# saturating int16 sums; with 7-bit weights the sums cannot saturate. Measured on the tiny model, AVX2 CPU:
# relative error of the noise prediction 0.25-0.54 (OpenVINO) / 0.04-0.09 (ONNX Runtime) with it, 0.29-0.59 /
# 0.05-0.11 with NNCF's default (first layer only).
OVERFLOW_FIX = "enable"


def require_nncf() -> Any:
    """NNCF and OpenVINO (which writes the int8 IR), or a clear error saying how to install them (checked
    before any work is done)."""
    try:
        import nncf
        import openvino  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"--int8 needs NNCF and OpenVINO ({exc.name} is missing); "
                                      f"{install_hint('int8')}") from exc
    return nncf


def _settings(nncf: Any, samples: list[dict[str, np.ndarray]], **backend_params: Any) -> dict[str, Any]:
    """``nncf.quantize``'s keyword arguments, the same for the ONNX and the OpenVINO quantization."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return dict(preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(samples),
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX),
                                                                   backend_params=backend_params))


def _how(nncf: Any, samples: list[Any]) -> dict[str, Any]:
    return {"method": "nncf.quantize", "nncf": nncf.__version__, "preset": "mixed", "model_type": "transformer",
            "calibration_inputs": len(samples)}


def capture_calibration(backend: Any, pastes: int = CALIBRATION_PASTES, steps: int = CALIBRATION_STEPS
                        ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs of every U-Net call while ``backend`` (the torch backend being exported) samples the demo images:
    ``{"unet": [...], "unet_shallow": [...], "outputs": [...]}``: each graph's input dicts (numpy, float32/int64)
    and torch's noise prediction for each (the same for both graphs: the shallow pass on the features of the
    same pass is the full pass)."""
    from composekit.apps.demo import demo_images
    from composekit.compositor import Compositor

    background, obj, _ = demo_images()
    comp = Compositor._from_backend(backend)
    samples: dict[str, list[Any]] = {"unet": [], "unet_shallow": [], "outputs": []}
    inner = comp.backend.inner

    def recording_unet(sample: Any, timestep: int, context: Any) -> Any:
        if inner.info.feature_cache:
            eps, features = inner.unet_with_features(sample, timestep, context)
        else:
            eps, features = inner.unet(sample, timestep, context), None
        inputs = {"sample": inner.to_numpy(sample),
                  "timestep": np.full((sample.shape[0],), int(timestep), np.int64),
                  "encoder_hidden_states": inner.to_numpy(context)}
        samples["unet"].append(inputs)
        samples["outputs"].append(inner.to_numpy(eps))
        if features is not None:
            samples["unet_shallow"].append({**inputs, "features": inner.to_numpy(features)})
        return eps

    width, height = background.size
    side = min(width, height) // 3
    inner.unet = recording_unet  # this instance only, for the calibration runs
    try:
        for i in range(pastes):
            x0 = (width - side) * i // max(pastes - 1, 1)
            y0 = (height - side) * ((i + 1) % pastes) // max(pastes - 1, 1)
            comp.paste(obj, background, (x0, y0, x0 + side, y0 + side), steps=steps, seed=i, progress=False)
    finally:
        del inner.unet  # back to the class's method
    return samples


def quantize_graph(path: Path, spec: ComponentSpec, samples: list[dict[str, np.ndarray]], scratch: Path,
                   big: bool) -> dict[str, Any]:
    """Quantize the ONNX graph at ``path`` in place (NNCF, calibrated on ``samples``); returns what the manifest
    records about it. ``big``: write the weights as external data (``NAME.onnx.data``)."""
    nncf = require_nncf()
    import onnx

    from composekit_export.onnx_export import save_graph

    model = onnx.load(str(path), load_external_data=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, nncf.Dataset(samples),
                                  **_settings(nncf, samples, external_data_dir=str(path.parent.resolve())))
    del model
    work = scratch / f"int8-{spec.name}"
    work.mkdir()
    save_graph(quantized, work / spec.file, big)  # beside, then moved in: the old weights may still be read
    del quantized
    old_data = path.parent / f"{spec.file}.data"
    if old_data.exists():
        old_data.unlink()
    for f in work.iterdir():
        os.replace(f, path.parent / f.name)
    shutil.rmtree(work)
    onnx.checker.check_model(str(path))
    return _how(nncf, samples)


def quantize_openvino(path: Path, spec: ComponentSpec, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Quantize the float ONNX graph at ``path`` with NNCF's OpenVINO backend (calibrated on ``samples``) and
    save the result as an OpenVINO IR beside it: ``NAME.int8.xml`` and ``NAME.int8.bin``, float weights kept in
    float32. The graph keeps its open batch dimension (the backend compiles it per batch size). Returns what the
    manifest records about it, with the two file names."""
    nncf = require_nncf()
    import openvino as ov

    model = ov.Core().read_model(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, nncf.Dataset(samples), **_settings(nncf, samples))
    del model
    xml = path.parent / openvino_ir_name(spec.file)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    del quantized
    return {**_how(nncf, samples), "openvino": ov.__version__, "file": xml.name, "weights": xml.with_suffix(".bin").name}


def openvino_ir_name(onnx_file: str) -> str:
    """``unet.onnx`` -> ``unet.int8.xml`` (its weights: ``unet.int8.bin``)."""
    return f"{Path(onnx_file).stem}.int8.xml"
