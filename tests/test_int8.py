"""The int8 export (``composekit-export onnx --int8``): NNCF post-training quantization of the U-Net graphs.

Reference: the torch backend's fp32 noise prediction on the sampler's own inputs (captured the way the
exporter captures its calibration inputs, at other seeds). Tolerances are relative L2 errors measured on
the tiny random model (random weights quantize worse than trained ones; the full-size figures are in
docs/benchmarks.md): ONNX Runtime <= 0.2, OpenVINO <= 0.8 (its int8 kernels round differently), and each
must be well below the error of an unrelated prediction (~1.4-1.5).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import gradient_background, noise_object

from composekit import BackendUnavailableError, Compositor, InputError

pytest.importorskip("nncf")
onnx = pytest.importorskip("onnx")


def test_the_manifest_records_the_quantized_graphs(int8_export, exported):
    from composekit.formats.export_manifest import read_manifest

    manifest = read_manifest(int8_export)
    assert sorted(manifest.int8) == ["unet", "unet_shallow"]
    for entry in manifest.int8.values():
        assert entry["method"] == "nncf.quantize" and entry["calibration_inputs"] == 18 and entry["nncf"]
    assert manifest.data["versions"]["nncf"] == manifest.int8["unet"]["nncf"]
    graph = onnx.load(str(manifest.path("unet")))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer)  # weights stored as int8
    float_unet = read_manifest(exported["paint_by_example"][1]).component("unet")["bytes"]
    assert manifest.component("unet")["bytes"] < 0.6 * float_unet
    assert manifest.component("vae_decoder")["sha256"] == read_manifest(exported["paint_by_example"][1]).component(
        "vae_decoder")["sha256"]  # only the U-Net graphs are quantized


@pytest.mark.parametrize("backend,bound", [("onnxruntime", 0.2), ("openvino", 0.8)])
def test_int8_noise_prediction_against_torch_fp32(int8_export, compositor, backend, bound):
    if backend == "openvino":
        pytest.importorskip("openvino")
    from composekit_export.quantize import capture_calibration

    torch_backend = compositor.backend.inner
    inputs = capture_calibration(torch_backend, pastes=1, steps=4)  # other timesteps than the calibration's
    graph = Compositor.from_pretrained(int8_export, backend=backend).backend
    for component in ("unet", "unet_shallow"):
        for item in inputs[component]:
            ref = torch_backend.to_numpy(torch_backend.unet(torch_backend.asarray(item["sample"]),
                                                            int(item["timestep"][0]),
                                                            torch_backend.asarray(item["encoder_hidden_states"])))
            got = graph._run(component, item)[0]
            error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert error <= bound, (component, error)
            unrelated = np.linalg.norm(np.roll(ref, 1, axis=1) - ref) / np.linalg.norm(ref)
            assert unrelated > 1.5 * bound  # the bound is well below what an unrelated prediction gives


def test_int8_export_loads_with_no_options_and_keeps_the_background(int8_export):
    comp = Compositor.from_pretrained(int8_export)  # auto: OpenVINO here, ONNX Runtime without it
    assert "int8 U-Net" in comp.backend.describe()
    bg = gradient_background(120, 90)
    result = comp.paste(noise_object(), bg, (20, 10, 90, 80), steps=4, seed=1, cache_interval=3, progress=False)
    image = np.asarray(result.image)
    np.testing.assert_array_equal(image[~result.mask], np.asarray(bg)[~result.mask])
    assert np.abs(image.astype(np.int16) - np.asarray(bg, np.int16))[result.mask].mean() > 5  # it generated


def test_refusals(tiny_model_dir, tmp_path, monkeypatch):
    from composekit_export.onnx_export import export_onnx

    with pytest.raises(InputError, match="--int8 .* --fp16 or --optimize"):
        export_onnx(tiny_model_dir, tmp_path / "a", int8=True, precision="fp16")
    with pytest.raises(InputError, match="--int8"):
        export_onnx(tiny_model_dir, tmp_path / "b", int8=True, optimize="cpu")
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if the int8 extra were not installed
    with pytest.raises(BackendUnavailableError, match="NNCF.*int8"):
        export_onnx(tiny_model_dir, tmp_path / "c", int8=True)
    assert not (tmp_path / "c").exists()
    proc = subprocess.run([sys.executable, "-m", "composekit_export", "onnx", str(tiny_model_dir), str(tmp_path / "d"),
                           "--int8", "--fp16"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--int8" in proc.stderr and "Traceback" not in proc.stderr
