"""The OpenVINO backend on tiny exports of both families (CPU): parity with torch and ONNX Runtime,
the background guarantee, batches, fidelity, precision and option errors, the compiled-model cache,
threads, and no torch import. The export checks (tampered manifests, swapped graphs, generated
mutations) run on OpenVINO too, in test_hostile.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import assert_batch_matches_one_by_one, gradient_background, noise_object, run_in_threads

from composekit import BackendUnavailableError, Compositor, InputError, ModelError

pytest.importorskip("openvino")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BOX = (20, 10, 100, 80)
# Measured on this project's CPU (tiny random models of both families, 5 steps, 2026-11-25): f32 final
# latents differ from torch's by 1.8e-5..3.0e-5 (bound 1e-3, as ONNX Runtime's), bf16 by 0.48 where the
# latents reach 17-18, i.e. 2.8% of their largest value (bound 6%); images by 0 (bound 2) and 6-8
# (bound 16) levels of 255.
LATENT_BOUND = {"f32": 1e-3, "bf16": 0.06}
IMAGE_BOUND = {"f32": 2, "bf16": 16}


def _bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


PRECISIONS = ["f32"] + (["bf16"] if _bf16() else [])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_openvino_matches_torch(exported, family, precision):
    src, dst = exported[family]
    torch_comp = Compositor.from_pretrained(src, device="cpu")
    ov_comp = Compositor.from_pretrained(dst, backend="openvino", precision=precision)
    assert ov_comp.backend.name == "openvino" and ov_comp.backend.info.family == family
    assert precision in ov_comp.backend.describe()
    bg, obj = gradient_background(140, 100), noise_object()
    lat_t, lat_o = [], []
    a = torch_comp.paste(obj, bg, BOX, steps=5, seed=3, progress=False, callback=lambda i, t, x: lat_t.append(x))
    b = ov_comp.paste(obj, bg, BOX, steps=5, seed=3, progress=False, callback=lambda i, t, x: lat_o.append(x))
    scale = max(1.0, float(np.abs(lat_t[-1]).max())) if precision != "f32" else 1.0
    assert np.abs(lat_t[-1] - lat_o[-1]).max() <= LATENT_BOUND[precision] * scale
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= IMAGE_BOUND[precision]
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])  # background exact


def test_openvino_f32_equals_onnxruntime_closely_and_guidance_cutoff_runs(exported):
    _, dst = exported["paint_by_example"]
    ort = Compositor.from_pretrained(dst, backend="onnxruntime", device="cpu")
    ov = Compositor.from_pretrained(dst, backend="openvino", device="cpu", precision="f32")
    bg, obj = gradient_background(140, 100), noise_object()
    kw = dict(steps=4, seed=2, guidance_end=0.5, progress=False)  # U-Net batch 2, then batch 1
    lat_r, lat_v = [], []
    a = ort.paste(obj, bg, BOX, callback=lambda i, t, x: lat_r.append(x), **kw)
    b = ov.paste(obj, bg, BOX, callback=lambda i, t, x: lat_v.append(x), **kw)
    for x, y in zip(lat_r, lat_v):
        assert np.abs(x - y).max() <= 1e-4
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1
    assert set(ov.backend.compiled) >= {("unet", 1), ("unet", 2)}  # static shapes, compiled at load


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_paste_batch_and_fidelity_on_openvino(exported, family):
    _, dst = exported[family]
    comp = Compositor.from_pretrained(dst, backend="openvino", precision="f32")
    jobs = [dict(object=noise_object(seed=i), background=gradient_background(140 + 20 * i, 100), box=BOX, seed=i)
            for i in range(3)]
    jobs.insert(1, dict(object=noise_object(), background=gradient_background(40, 40), box=BOX))
    results = comp.paste_batch(jobs, batch_size=4, steps=2, guidance=3.0)
    assert isinstance(results[1], InputError)
    assert ("unet", 6) in comp.backend.compiled  # a batch size not compiled at load, compiled on first use
    assert_batch_matches_one_by_one(comp, jobs, results, steps=2, guidance=3.0)
    bg, obj = gradient_background(140, 100), noise_object()
    plain = np.asarray(comp.paste(obj, bg, BOX, steps=3, seed=1, progress=False).image)
    zero = np.asarray(comp.paste(obj, bg, BOX, steps=3, seed=1, progress=False, fidelity=0.0).image)
    np.testing.assert_array_equal(plain, zero)
    faithful = comp.paste(obj, bg, BOX, steps=3, seed=1, progress=False, fidelity=0.7)
    assert not np.array_equal(np.asarray(faithful.image), plain)
    np.testing.assert_array_equal(np.asarray(faithful.image)[~faithful.mask], np.asarray(bg)[~faithful.mask])


def test_options_and_devices_are_checked(exported, tmp_path):
    _, dst = exported["paint_by_example"]
    src, _ = exported["paint_by_example"]
    with pytest.raises(InputError, match="precision must be one of"):
        Compositor.from_pretrained(dst, backend="openvino", precision="int4")
    with pytest.raises(BackendUnavailableError, match="cuda devices run with: .*tensorrt"):
        Compositor.from_pretrained(dst, backend="openvino", device="cuda")
    with pytest.raises(BackendUnavailableError, match="not available to OpenVINO"):
        Compositor.from_pretrained(dst, backend="openvino", device="npu.7")
    with pytest.raises(InputError, match="threads"):
        Compositor.from_pretrained(dst, backend="openvino", threads=0)
    with pytest.raises(InputError, match="dtype"):
        Compositor.from_pretrained(dst, backend="openvino", dtype="float16")
    with pytest.raises(ModelError, match="not an exported model"):
        Compositor.from_pretrained(src, backend="openvino")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cache folder"):
        Compositor.from_pretrained(dst, backend="openvino", cache_dir=blocker / "sub")
    with pytest.raises(InputError, match="takes no option"):
        Compositor.from_pretrained(dst, backend="openvino", providers=["CPUExecutionProvider"])
    # auto never falls back to the CPU when a GPU was asked for: onnxruntime is chosen and says why it cannot
    with pytest.raises(BackendUnavailableError, match="GPU provider"):
        Compositor.from_pretrained(dst, device="cuda")


@pytest.mark.parametrize("cap, allows", [(None, True), ("", True), ("ALL", True), ("avx2", False), ("AVX2_VNNI", False),
                                         ("AVX512_CORE", False), ("AVX512_CORE_VNNI", False), ("AVX512_CORE_BF16", True),
                                         ("AVX512_CORE_AMX", True), ("AVX10_1_512", True), ("SSE41", False)])
def test_onednn_isa_cap_decides_whether_bf16_is_the_default(cap, allows):
    from composekit.backends.openvino_backend import default_precision, isa_cap_allows_bf16

    assert isa_cap_allows_bf16(cap) is allows
    assert default_precision({"FP32", "BF16", "INT8"}, cap) == ("bf16" if allows else "f32")
    assert default_precision({"FP32", "INT8"}, cap) == "f32"  # a CPU without BF16: f32 whatever the cap


def test_under_an_avx2_cap_the_default_is_f32_and_bf16_is_refused(exported, monkeypatch):
    """OpenVINO reports BF16 from the CPU even when ONEDNN_MAX_CPU_ISA keeps its kernels below it; a bf16 graph then
    fails to compile (seen on an AVX-512-BF16 CPU: 'Supported primitive descriptors list is empty ... Softmax')."""
    _, dst = exported["paint_by_example"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    comp = Compositor.from_pretrained(dst, backend="openvino", cache_dir=False)
    assert comp.backend.describe().startswith("OpenVINO CPU, f32")
    reason = "ONEDNN_MAX_CPU_ISA=AVX2 keeps" if _bf16() else "not supported"
    with pytest.raises(BackendUnavailableError, match=f"bf16.*{reason}.*precision='f32'"):
        Compositor.from_pretrained(dst, backend="openvino", precision="bf16", cache_dir=False)


def test_compiled_model_cache_and_threads(exported, tmp_path):
    _, dst = exported["objectstitch"]
    bg, obj = gradient_background(120, 90), noise_object()
    images = []
    for _ in range(2):  # the second load reads the compiled models from the cache; the result is the same
        comp = Compositor.from_pretrained(dst, backend="openvino", precision="f32", cache_dir=tmp_path / "c", threads=1)
        images.append(np.asarray(comp.paste(obj, bg, BOX, steps=2, seed=5, progress=False).image))
    assert list((tmp_path / "c" / "cpu-f32").glob("*.blob"))
    np.testing.assert_array_equal(images[0], images[1])
    assert comp.backend.config["INFERENCE_NUM_THREADS"] == 1
    uncached = Compositor.from_pretrained(dst, backend="openvino", precision="f32", cache_dir=False)
    assert "CACHE_DIR" not in uncached.backend.config
    np.testing.assert_array_equal(np.asarray(uncached.paste(obj, bg, BOX, steps=2, seed=5, progress=False).image),
                                  images[0])


def test_region_decode_matches_torch_and_keeps_the_cache_and_memory_bounded(exported, tmp_path, monkeypatch):
    from composekit.core import sampler

    monkeypatch.setattr(sampler, "REGION_MARGIN", 1)  # the tiny model's 8x8 latent: leave cells outside
    src, dst = exported["paint_by_example"]
    torch_comp = Compositor.from_pretrained(src, device="cpu")
    comp = Compositor.from_pretrained(dst, backend="openvino", precision="f32", cache_dir=tmp_path / "c")
    assert comp.backend.info.any_size_decode
    blobs = sorted((tmp_path / "c" / "cpu-f32").glob("*.blob"))
    bg, obj = gradient_background(300, 220), noise_object()
    box = (30, 20, 110, 90)  # a quarter of the 2x context window: the region is smaller than the window
    kw = dict(steps=3, seed=4, progress=False)
    window = comp.paste(obj, bg, box, **kw)
    region = comp.paste(obj, bg, box, decode="region", **kw)
    reference = torch_comp.paste(obj, bg, box, decode="region", **kw)
    assert [k[2:] for k in comp.backend._regions] and all(k[2:] != (8, 8) for k in comp.backend._regions)
    diff = np.abs(np.asarray(region.image, np.int16) - np.asarray(reference.image, np.int16)).max()
    assert diff <= IMAGE_BOUND["f32"], diff  # the same crop decoded by torch
    assert (np.asarray(region.image) != np.asarray(window.image)).any()  # a crop, not the window
    np.testing.assert_array_equal(np.asarray(region.image)[~region.mask], np.asarray(bg)[~region.mask])
    # region sizes are compiled without the on-disk cache (it would grow with every box size), the last few kept
    assert sorted((tmp_path / "c" / "cpu-f32").glob("*.blob")) == blobs
    from composekit.backends.openvino_backend import OpenVINOBackend

    monkeypatch.setattr(OpenVINOBackend, "region_decoders", 2)
    seen = set(comp.backend._regions)
    for b in [(10, 10, 60, 30), (10, 10, 30, 60), (100, 60, 200, 160)]:  # wide, tall, square holes
        comp.paste(obj, bg, b, decode="region", **kw)
        seen |= set(comp.backend._regions)
        assert len(comp.backend._regions) <= 2
    assert len(seen) >= 3


def _cache_cli(*args, env=None):
    import json
    import os

    proc = subprocess.run([sys.executable, "-m", "composekit", "cache", "--json", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    return proc.returncode, (json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr)


def test_composekit_cache_shows_and_clears_the_compiled_models(exported, tmp_path):
    _, dst = exported["paint_by_example"]
    folder = tmp_path / "openvino"  # where the default folder is under COMPOSEKIT_CACHE=tmp_path
    bg, obj = gradient_background(120, 90), noise_object()
    first = Compositor.from_pretrained(dst, backend="openvino", precision="f32", cache_dir=folder)
    expected = np.asarray(first.paste(obj, bg, BOX, steps=2, seed=5, progress=False).image)
    blobs = list((folder / "cpu-f32").glob("*.blob"))
    (folder / "notes.txt").write_text("a file of the user's: not the cache's")
    (folder / "cpu-f32" / "keep.json").write_text("{}")
    code, shown = _cache_cli(env={"COMPOSEKIT_CACHE": str(tmp_path)})  # the default folder follows the variable
    assert code == 0 and shown["folder"] == str(folder)
    assert shown["files"] == len(blobs) > 0 and shown["bytes"] == sum(b.stat().st_size for b in blobs)
    assert shown["folders"]["cpu-f32"]["files"] == len(blobs)
    code, cleared = _cache_cli("--clear", "--dir", folder)
    assert code == 0 and cleared["removed_files"] == len(blobs) and cleared["freed_bytes"] == shown["bytes"]
    assert not list(folder.rglob("*.blob"))
    assert (folder / "notes.txt").exists() and (folder / "cpu-f32" / "keep.json").exists()  # only blobs go
    assert _cache_cli("--dir", folder)[1]["files"] == 0
    # the loaded model keeps running; a new load compiles and caches again, with the same result
    np.testing.assert_array_equal(np.asarray(first.paste(obj, bg, BOX, steps=2, seed=5, progress=False).image),
                                  expected)
    again = Compositor.from_pretrained(dst, backend="openvino", precision="f32", cache_dir=folder)
    np.testing.assert_array_equal(np.asarray(again.paste(obj, bg, BOX, steps=2, seed=5, progress=False).image),
                                  expected)
    assert len(list((folder / "cpu-f32").glob("*.blob"))) == len(blobs)


def test_composekit_cache_on_a_missing_folder_and_on_a_file(tmp_path):
    code, shown = _cache_cli("--dir", tmp_path / "never")
    assert code == 0 and shown == {"folder": str(tmp_path / "never"), "files": 0, "bytes": 0, "folders": {}}
    (tmp_path / "f").write_text("x")
    code, err = _cache_cli("--clear", "--dir", tmp_path / "f")
    assert code != 0 and "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "x"


def test_one_backend_serves_several_threads(exported):
    _, dst = exported["paint_by_example"]
    comp = Compositor.from_pretrained(dst, backend="openvino", precision="f32")
    bg, obj = gradient_background(120, 90), noise_object()
    expected = {s: np.asarray(comp.paste(obj, bg, BOX, steps=2, seed=s, progress=False).image) for s in range(4)}
    got = run_in_threads(lambda seed: np.asarray(comp.paste(obj, bg, BOX, steps=2, seed=seed, progress=False).image),
                         list(range(4)))
    for s in range(4):
        np.testing.assert_array_equal(got[s], expected[s])


def test_openvino_never_imports_torch(exported):
    _, dst = exported["paint_by_example"]
    code = textwrap.dedent(f"""
        import logging, sys
        import numpy as np
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from composekit import Compositor
        comp = Compositor.from_pretrained({str(dst)!r})
        bg = np.full((90, 120, 3), 100, np.uint8)
        r = comp.paste(np.full((30, 30, 3), 200, np.uint8), bg, (10, 10, 60, 60), steps=2, seed=0, progress=False)
        assert (r.image[~r.mask] == bg[~r.mask]).all()
        assert "torch" not in sys.modules, "the openvino path imported torch"
        print("BACKEND", comp.backend.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BACKEND openvino" in out.stdout
    assert "backend='auto' chose 'openvino'" in out.stdout and "OpenVINO is installed" in out.stdout
