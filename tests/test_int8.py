"""The int8 export (``composekit-export onnx --int8``): NNCF post-training quantization of the U-Net graphs.

Reference: the torch backend's fp32 noise prediction on the sampler's own inputs (captured the way the
exporter captures its calibration inputs, at other seeds). Tolerances are relative L2 errors measured on
the tiny random model (random weights quantize worse than trained ones; the full-size figures are in
docs/benchmarks.md): <= 0.2 for ONNX Runtime (the QDQ graph) and for OpenVINO (the OpenVINO IR; on the QDQ
graph OpenVINO's int8 kernels had needed 0.8), and each must be well below the error of an unrelated
prediction (~1.4-1.5).
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
    assert manifest.data["versions"]["openvino"] == manifest.int8["unet"]["openvino"]
    graph = onnx.load(str(manifest.path("unet")))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer)  # weights stored as int8
    float_unet = read_manifest(exported["paint_by_example"][1]).component("unet")["bytes"]
    assert manifest.component("unet")["bytes"] < 0.6 * float_unet
    assert manifest.component("vae_decoder")["sha256"] == read_manifest(exported["paint_by_example"][1]).component(
        "vae_decoder")["sha256"]  # only the U-Net graphs are quantized
    # Beside each QDQ graph, the OpenVINO IR NNCF quantized for OpenVINO, its two files listed with sha256.
    for name in ("unet", "unet_shallow"):
        ir = manifest.component(name)["openvino"]
        assert ir["file"] == f"{name}.int8.xml" and [d["file"] for d in ir["external_data"]] == [f"{name}.int8.bin"]
        assert manifest.openvino_path(name) == int8_export / f"{name}.int8.xml"
        assert manifest.int8[name]["openvino"]
        xml = (int8_export / ir["file"]).read_text()
        assert "FakeQuantize" in xml  # activations and weights quantized for OpenVINO's int8 kernels
        assert ir["max_abs_error_vs_torch"] is not None
    assert manifest.component("vae_decoder").get("openvino") is None


@pytest.mark.parametrize("backend,bound", [("onnxruntime", 0.2), ("openvino", 0.2)])
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


def test_openvino_runs_the_ir_closer_to_fp32_than_the_qdq_graph(int8_export, compositor, tmp_path):
    """The OpenVINO backend reads the OpenVINO IR, not the QDQ graph; on the same sampler inputs (other timesteps
    than the calibration's) the IR's noise prediction is closer to torch fp32's than the QDQ graph's run by
    OpenVINO (what the IR is for; full-size figures in docs/benchmarks.md)."""
    pytest.importorskip("openvino")
    import json
    import shutil

    from composekit_export.quantize import capture_calibration

    torch_backend = compositor.backend.inner
    inputs = capture_calibration(torch_backend, pastes=1, steps=4)["unet"]
    ir = Compositor.from_pretrained(int8_export, backend="openvino", precision="f32").backend
    assert "OpenVINO IR" in ir.describe()
    qdq_copy = tmp_path / "qdq-only"
    shutil.copytree(int8_export, qdq_copy)
    manifest = json.loads((qdq_copy / "manifest.json").read_text())
    for name in ("unet", "unet_shallow"):
        del manifest["components"][name]["openvino"]  # as exports written before the IR: the QDQ graph
    (qdq_copy / "manifest.json").write_text(json.dumps(manifest))
    qdq = Compositor.from_pretrained(qdq_copy, backend="openvino", precision="f32").backend
    assert "OpenVINO IR" not in qdq.describe()
    errors = {"ir": [], "qdq": []}
    for item in inputs:
        ref = torch_backend.to_numpy(torch_backend.unet(torch_backend.asarray(item["sample"]), int(item["timestep"][0]),
                                                        torch_backend.asarray(item["encoder_hidden_states"])))
        for form, backend in (("ir", ir), ("qdq", qdq)):
            errors[form].append(np.linalg.norm(backend._run("unet", item)[0] - ref) / np.linalg.norm(ref))
    assert np.mean(errors["ir"]) < np.mean(errors["qdq"]), errors


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
