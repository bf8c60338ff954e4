"""ONNX export and the onnxruntime backend, on tiny models of both families (CPU)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import assert_batch_matches_one_by_one, gradient_background, noise_object

from composekit import BackendUnavailableError, Compositor, InputError, ModelError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

BOX = (20, 10, 100, 80)


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_onnxruntime_matches_torch(exported, family):
    src, dst = exported[family]
    torch_comp = Compositor.from_pretrained(src, device="cpu")
    ort_comp = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu")
    assert ort_comp.backend.name == "onnxruntime" and ort_comp.backend.info.family == family
    bg, obj = gradient_background(140, 100), noise_object()
    lat_t, lat_o = [], []
    a = torch_comp.paste(obj, bg, BOX, steps=5, seed=3, progress=False, callback=lambda i, t, x: lat_t.append(x))
    b = ort_comp.paste(obj, bg, BOX, steps=5, seed=3, progress=False, callback=lambda i, t, x: lat_o.append(x))
    assert np.abs(lat_t[-1] - lat_o[-1]).max() <= 1e-3
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])


def test_manifest_describes_what_the_runtime_uses(exported):
    _, dst = exported["paint_by_example"]
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["source"]["family"] == "paint_by_example" and manifest["precision"] == "fp32"
    assert manifest["dims"]["unet_in_channels"] == 9 and manifest["opset"] == 17
    for name, c in manifest["components"].items():
        assert len(c["sha256"]) == 64 and c["bytes"] > 0 and c["inputs"] and c["outputs"]
        assert c["max_abs_error_vs_torch"] < 1e-4, name
    assert manifest["scheduler"]["beta_schedule"] == "scaled_linear"


def test_export_survives_deleting_the_source_and_does_not_import_torch(exported, tmp_path, tiny_model_dir):
    from composekit_export.onnx_export import export_onnx

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    export_onnx(src, tmp_path / "export")
    shutil.rmtree(src)
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from composekit import Compositor
        comp = Compositor.from_pretrained({str(tmp_path / 'export')!r}, backend="auto", device="cpu")
        bg = np.full((90, 120, 3), 100, np.uint8)
        r = comp.paste(np.full((30, 30, 3), 200, np.uint8), bg, (10, 10, 60, 60), steps=2, seed=0, progress=False)
        assert (r.image[~r.mask] == bg[~r.mask]).all()
        assert "torch" not in sys.modules, "the onnxruntime path imported torch"
        print(comp.backend.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # auto on a machine without CUDA: OpenVINO when it is installed, else ONNX Runtime
    import importlib.util

    assert out.stdout.strip() == ("openvino" if importlib.util.find_spec("openvino") else "onnxruntime")


def test_fp16_graphs_load_and_run(tmp_path, tiny_model_dir):
    from composekit_export.onnx_export import export_onnx

    manifest = export_onnx(tiny_model_dir, tmp_path / "fp16", precision="fp16")
    errors = {k: v["max_abs_error_vs_torch"] for k, v in manifest["components"].items()}
    # Measured against the fp32 PyTorch reference: fp16 rounding, stated, not hidden.
    assert all(e < 5e-2 for e in errors.values()), errors
    comp = Compositor.from_pretrained(tmp_path / "fp16", backend="onnxruntime", device="cpu")
    assert "fp16" in comp.backend.describe()
    bg = gradient_background(64, 64)
    r = comp.paste(noise_object(), bg, (8, 8, 40, 40), steps=2, seed=0, progress=False)
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])


def test_tampered_or_incomplete_exports_are_refused(exported, tmp_path):
    _, dst = exported["paint_by_example"]
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    with open(copy / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        Compositor.from_pretrained(copy, backend="onnxruntime")
    (copy / "unet.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        Compositor.from_pretrained(copy, backend="onnxruntime")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["components"]["unet"]["file"] = "../unet.onnx"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="inside the export directory"):
        Compositor.from_pretrained(copy, backend="onnxruntime")


def test_external_data_outside_the_directory_is_refused_without_reading_it(exported, tmp_path):
    import onnx

    from composekit.formats.export_manifest import sha256_file

    _, dst = exported["paint_by_example"]
    copy = tmp_path / "evil"
    shutil.copytree(dst, copy)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 64)
    model = onnx.load(str(copy / "vae_decoder.onnx"))
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with open(copy / "vae_decoder.onnx", "wb") as f:
        f.write(model.SerializeToString())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["sha256"] = sha256_file(copy / "vae_decoder.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = secret.stat().st_atime_ns
    with pytest.raises(ModelError, match="outside the export"):
        Compositor.from_pretrained(copy, backend="onnxruntime")
    assert secret.stat().st_atime_ns == before


def test_provider_and_option_errors(exported, tiny_model_dir):
    import onnxruntime

    _, dst = exported["paint_by_example"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            Compositor.from_pretrained(dst, backend="onnxruntime", device="cuda")
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
            Compositor.from_pretrained(dst, backend="onnxruntime", providers=["CUDAExecutionProvider"])
    comp = Compositor.from_pretrained(dst, backend="onnxruntime", providers=["CPUExecutionProvider"],
                                      intra_op_threads=1, graph_optimization="basic")
    assert comp.backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="graph_optimization"):
        Compositor.from_pretrained(dst, backend="onnxruntime", graph_optimization="max")
    with pytest.raises(InputError, match="takes no option"):
        Compositor.from_pretrained(dst, backend="onnxruntime", threads=2)
    with pytest.raises(InputError, match="precision"):
        Compositor.from_pretrained(dst, backend="onnxruntime", dtype="float16")
    with pytest.raises(ModelError, match="onnxruntime"):
        Compositor.from_pretrained(dst, backend="torch")
    with pytest.raises(ModelError, match="composekit-export onnx"):
        Compositor.from_pretrained(tiny_model_dir, backend="onnxruntime")


def test_failed_export_leaves_no_directory(tiny_model_dir, tmp_path, monkeypatch):
    import composekit_export.onnx_export as ox

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ox, "_check_one", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        ox.export_onnx(tiny_model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_cli(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "composekit_export", "onnx", tiny_model_dir, tmp_path / "cli"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unet" in proc.stdout and "max |onnxruntime - torch|" in proc.stdout
    assert (tmp_path / "cli" / "manifest.json").exists()


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_io_binding_gives_the_same_result_as_plain_runs(exported, family):
    # IO binding on host buffers: the binding code the CUDA path uses (with CuPy buffers) on the CPU.
    _, dst = exported[family]
    plain = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu")
    bound = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu", io_binding=True)
    assert "IO binding on cpu" in bound.backend.describe() and "IO binding" not in plain.backend.describe()
    bg, obj = gradient_background(140, 100), noise_object()
    lat_p, lat_b = [], []
    kw = dict(steps=4, seed=2, guidance_end=0.5, progress=False)  # batch 2, then batch 1
    a = plain.paste(obj, bg, BOX, callback=lambda i, t, x: lat_p.append(x), **kw)
    b = bound.paste(obj, bg, BOX, callback=lambda i, t, x: lat_b.append(x), **kw)
    for x, y in zip(lat_p, lat_b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(InputError, match="io_binding"):
        Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu", io_binding="yes")
    with pytest.raises(InputError, match="fixed size"):  # ONNX Runtime's exported decoder cannot decode a crop
        bound.paste(obj, bg, BOX, steps=1, progress=False, decode="region")
    # the default backend is "auto": an export directory needs no backend argument (OpenVINO when installed)
    import importlib.util

    expected = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    assert Compositor.from_pretrained(dst, device="cpu").backend.name == expected


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_fidelity_on_onnxruntime(exported, family):
    # fidelity=0 is the plain sampler bit for bit; with fidelity on, ONNX Runtime equals torch within the
    # export tolerance (latents 1e-3, images 2/255), as without it: the guidance is sampler arithmetic.
    src, dst = exported[family]
    torch_comp = Compositor.from_pretrained(src, device="cpu")
    ort_comp = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu")
    bg, obj = gradient_background(140, 100), noise_object()
    kw = dict(steps=4, seed=3, progress=False)
    plain, zero = (np.asarray(ort_comp.paste(obj, bg, BOX, **kw, **extra).image) for extra in ({}, {"fidelity": 0.0}))
    np.testing.assert_array_equal(plain, zero)
    lat_t, lat_o = [], []
    a = torch_comp.paste(obj, bg, BOX, fidelity=0.6, callback=lambda i, t, x: lat_t.append(x), **kw)
    b = ort_comp.paste(obj, bg, BOX, fidelity=0.6, callback=lambda i, t, x: lat_o.append(x), **kw)
    assert np.abs(lat_t[-1] - lat_o[-1]).max() <= 1e-3
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(b.image), plain)  # the option did something
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_paste_batch_on_onnxruntime(exported, family):
    # One U-Net call per step for the batch; each job equals its own one-by-one paste on the same backend.
    _, dst = exported[family]
    comp = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu")
    assert comp.backend.info.max_batch == 8
    jobs = [dict(object=noise_object(seed=i), background=gradient_background(140 + 20 * i, 100), box=BOX, seed=i)
            for i in range(3)]
    jobs.insert(1, dict(object=noise_object(), background=gradient_background(40, 40), box=BOX))
    calls = []
    unet = comp.backend.unet
    comp.backend.unet = lambda sample, t, ctx: calls.append(sample.shape[0]) or unet(sample, t, ctx)
    try:
        results = comp.paste_batch(jobs, batch_size=4, steps=2, guidance=3.0)
    finally:
        del comp.backend.unet
    assert calls == [6, 6]  # 3 good jobs x 2 (guidance), one call per step
    assert isinstance(results[1], InputError)
    assert_batch_matches_one_by_one(comp, jobs, results, steps=2, guidance=3.0)


def test_export_batch_range_is_enforced(tmp_path, tiny_model_dir):
    from composekit_export.onnx_export import export_onnx

    export_onnx(tiny_model_dir, tmp_path / "one", max_batch=1)
    comp = Compositor.from_pretrained(tmp_path / "one", backend="onnxruntime", device="cpu")
    assert comp.backend.specs["unet"].ranges["B"] == (1, 2, 2)
    jobs = [(noise_object(), gradient_background(64, 64), (8, 8, 40, 40))] * 2
    with pytest.raises(InputError, match="--max-batch 2"):
        comp.paste_batch(jobs, batch_size=2, steps=1)
    assert len(comp.paste_batch(jobs, batch_size=1, steps=1)) == 2


def test_fused_export_for_onnxruntime(tmp_path, tiny_model_dir):
    # --optimize cpu: ONNX Runtime's attention and layer-norm fusions in the U-Net (the numpy >= 2.4
    # workaround makes the attention fusion run at all); same result as torch within the export tolerance.
    from composekit_export.onnx_export import export_onnx

    manifest = export_onnx(tiny_model_dir, tmp_path / "fused", optimize="cpu")
    assert manifest["optimized"] == "cpu" and manifest["components"]["unet"]["max_abs_error_vs_torch"] < 1e-4
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused" / "unet.onnx")).graph.node}
    assert {"Attention", "MultiHeadAttention"} & ops, ops  # attention was fused
    torch_comp = Compositor.from_pretrained(tiny_model_dir, device="cpu")
    fused = Compositor.from_pretrained(tmp_path / "fused", backend="onnxruntime", device="cpu")
    bg, obj = gradient_background(140, 100), noise_object()
    lat_t, lat_f = [], []
    torch_comp.paste(obj, bg, BOX, steps=3, seed=3, progress=False, callback=lambda i, t, x: lat_t.append(x))
    b = fused.paste(obj, bg, BOX, steps=3, seed=3, progress=False, callback=lambda i, t, x: lat_f.append(x))
    assert np.abs(lat_t[-1] - lat_f[-1]).max() <= 1e-3
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])
    if importlib.util.find_spec("openvino"):  # fused graphs hold ONNX Runtime's own operators
        with pytest.raises(ModelError, match="--optimize"):
            Compositor.from_pretrained(tmp_path / "fused", backend="openvino")
        # auto on this CPU machine picks OpenVINO for plain exports, but a fused export is ONNX Runtime's
        assert Compositor.from_pretrained(tmp_path / "fused", device="cpu").backend.name == "onnxruntime"
    with pytest.raises(InputError, match="optimize"):
        export_onnx(tiny_model_dir, tmp_path / "bad", optimize="gpu")


def test_external_data_is_readable_by_whoever_can_read_the_graph(tmp_path):
    """onnx writes a graph's external-data file for its owner only (0600); the exporter gives it the graph file's
    mode, so an export readable by a service account has readable weights too."""
    import os
    import stat

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from composekit_export.onnx_export import save_graph

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # 16 kB: over the external-data threshold
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "g.onnx"
    old = os.umask(0o022)
    try:
        assert save_graph(helper.make_model(graph), path, big=True) == [{"file": "g.onnx.data"}]
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o644 and stat.S_IMODE((tmp_path / "g.onnx.data").stat().st_mode) == mode
    assert onnx.load(str(path)).graph.initializer[0].name == "w"
