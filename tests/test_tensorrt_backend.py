"""The TensorRT backend's own code, run against a stand-in for TensorRT (``fake_tensorrt``).

No machine this project is built and tested on has TensorRT. These tests run everything of the
backend that is composekit's — engine directories, sidecar and staleness checks, tensor-name and
shape checks, binding buffers by address, one execution context per thread — with a fake TensorRT
that executes the ONNX graphs with ONNX Runtime on host buffers. Real TensorRT is exercised only by
``test_engines.py::test_build_engines_from_a_tiny_export``, which skips where TensorRT is absent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import assert_batch_matches_one_by_one, gradient_background, noise_object, run_in_threads

from composekit import BackendUnavailableError, Compositor, EngineIncompatibleError, InputError, ModelError
from composekit.apps.random_models import make_random_model
from composekit.backends import tensorrt_backend
from composekit.backends.arrays import ArrayModule

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
import fake_tensorrt  # noqa: E402  (needs onnxruntime)
from fake_tensorrt import FAKE_GPU, build_fake_engines  # noqa: E402

BOX = (20, 10, 100, 80)


@pytest.fixture()
def fake_trt(monkeypatch):
    """Route the backend's environment lookup to the stand-in, on host buffers."""
    env = {"gpu": FAKE_GPU, "trt": fake_tensorrt}
    monkeypatch.setattr(tensorrt_backend, "_runtime_environment",
                        lambda device: (env["trt"], ArrayModule("cpu"), env["gpu"]))
    return env


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_model_dir):
    from composekit_export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("trt")
    os_model = make_random_model(root / "os-src", "tiny", family="objectstitch", adaptor="mapper", seed=5)
    out = {}
    for family, src in (("paint_by_example", tiny_model_dir), ("objectstitch", os_model)):
        export_onnx(src, root / f"{family}-onnx")
        build_fake_engines(root / f"{family}-onnx", root / f"{family}-engines")
        shutil.rmtree(root / f"{family}-onnx")  # the engine directory must need nothing else
        out[family] = (src, root / f"{family}-engines")
    return out


@pytest.mark.parametrize("cache_interval", [1, 3])
@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_engines_composite_like_the_torch_backend(engines, fake_trt, family, cache_interval):
    src, engine_dir = engines[family]
    comp = Compositor.from_pretrained(engine_dir, backend="auto")
    assert comp.backend.name == "tensorrt" and comp.backend.info.family == family
    assert "TensorRT 10.99.0-fake" in comp.backend.describe() and comp.backend.info.feature_cache
    ref = Compositor.from_pretrained(src, device="cpu")
    bg, obj = gradient_background(140, 100), noise_object()
    lat_t, lat_e = [], []
    # guidance_end 0.6 alternates batch 2 and batch 1 on one context: shapes and addresses are re-set.
    # cache_interval=3: the unet_shallow engine, and the unet engine's features output.
    kw = dict(steps=5, seed=3, guidance_end=0.6, progress=False, cache_interval=cache_interval)
    a = ref.paste(obj, bg, BOX, callback=lambda i, t, x: lat_t.append(x), **kw)
    b = comp.paste(obj, bg, BOX, callback=lambda i, t, x: lat_e.append(x), **kw)
    assert np.abs(lat_t[-1] - lat_e[-1]).max() <= 1e-3
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])


def test_one_execution_context_per_thread(engines, fake_trt):
    _, engine_dir = engines["paint_by_example"]
    comp = Compositor.from_pretrained(engine_dir, backend="tensorrt")
    bg, obj = gradient_background(140, 100), noise_object()
    serial = np.asarray(comp.paste(obj, bg, BOX, steps=3, seed=1, progress=False).image)
    created = comp.backend.contexts_created
    results = run_in_threads(lambda _: np.asarray(comp.paste(obj, bg, BOX, steps=3, seed=1, progress=False).image),
                             list(range(4)))
    for r in results:
        np.testing.assert_array_equal(r, serial)
    # four new threads x three engines (the object's encoding is cached by the compositor after the first call)
    assert comp.backend.contexts_created == created + 4 * 3
    for engine in comp.backend.engines.values():
        assert all(len(c.threads) <= 1 for c in engine.contexts)  # no context ever served two threads


def test_buffers_are_allocated_once_per_shape(engines, fake_trt):
    _, engine_dir = engines["paint_by_example"]
    backend = Compositor.from_pretrained(engine_dir, backend="tensorrt").backend
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 9, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 1, 32)).astype(np.float32)
    first = backend.unet(sample, 500, context)
    again = backend.unet(sample, 500, context)
    np.testing.assert_array_equal(first, again)
    assert first is not again and not np.shares_memory(first, again)  # callers get copies, not the bound buffer
    _, bindings = backend._context("unet")
    assert len(bindings) == 1
    backend.unet(sample[:1], 500, context[:1])
    assert len(bindings) == 2
    with pytest.raises(InputError, match="B=17 .* outside the exported range 1..16"):  # --max-batch 8 (default)
        backend.unet(np.concatenate([sample] * 9)[:17], 500, np.concatenate([context] * 9)[:17])
    with pytest.raises(InputError, match="axis 1 must be 9"):
        backend.unet(sample[:, :4], 500, context)


def test_stale_or_tampered_engines_say_how_to_rebuild(engines, fake_trt, tmp_path):
    _, engine_dir = engines["paint_by_example"]
    fake_trt["gpu"] = ("Older GPU", "8.6")
    with pytest.raises(EngineIncompatibleError, match="rebuild the engines on this machine"):
        Compositor.from_pretrained(engine_dir, backend="tensorrt")
    fake_trt["gpu"] = FAKE_GPU
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    (copy / "unet.plan").write_bytes((copy / "unet.plan").read_bytes() + b"\0")
    with pytest.raises(ModelError, match="sha256"):
        Compositor.from_pretrained(copy, backend="tensorrt")
    (copy / "unet.plan.json").unlink()
    with pytest.raises(ModelError, match="no sidecar"):
        Compositor.from_pretrained(copy, backend="tensorrt")
    data = json.loads((copy / "engines.json").read_text())
    data["engines"]["unet"]["file"] = "../unet.plan"
    (copy / "engines.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="plain file name"):
        Compositor.from_pretrained(copy, backend="tensorrt")


def test_engine_with_the_wrong_tensors_is_refused(tiny_model_dir, fake_trt, tmp_path):
    from composekit_export.onnx_export import export_onnx

    export_onnx(tiny_model_dir, tmp_path / "onnx")
    swap = {"vae_decoder": "vae_encoder.onnx"}
    build_fake_engines(tmp_path / "onnx", tmp_path / "engines",
                       lambda name, path, spec: (path.parent / swap.get(name, path.name)).read_bytes())
    with pytest.raises(ModelError, match=r"vae_decoder.* are not the vae_decoder spec's \['latent'\]"):
        Compositor.from_pretrained(tmp_path / "engines", backend="tensorrt")


def test_option_and_environment_errors(engines, tiny_model_dir):
    _, engine_dir = engines["paint_by_example"]
    with pytest.raises(BackendUnavailableError, match="CUDA GPUs only"):
        Compositor.from_pretrained(engine_dir, backend="tensorrt", device="cpu")
    with pytest.raises(InputError, match="fixed when it is built"):
        Compositor.from_pretrained(engine_dir, backend="tensorrt", dtype="float16")
    with pytest.raises(InputError, match="cuda_graph"):
        tensorrt_backend.TensorRTBackend(engine_dir, trt=fake_tensorrt, arrays=ArrayModule("cpu"), gpu=FAKE_GPU,
                                         cuda_graph=True)
    with pytest.raises(ModelError, match="backend='tensorrt'"):
        Compositor.from_pretrained(engine_dir, backend="torch")
    with pytest.raises(ModelError, match="backend='tensorrt'"):
        Compositor.from_pretrained(engine_dir, backend="onnxruntime")
    with pytest.raises(ModelError, match="not a TensorRT engine directory"):
        Compositor.from_pretrained(tiny_model_dir, backend="tensorrt")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(engines):
    _, engine_dir = engines["paint_by_example"]
    with pytest.raises(BackendUnavailableError, match=r'pip install "\.\[trt\]"'):
        Compositor.from_pretrained(engine_dir, backend="auto")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_arrays_without_cupy_are_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="CuPy"):
        ArrayModule("cuda")
    with pytest.raises(InputError, match="not supported"):
        ArrayModule("tpu")


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_fidelity_on_engines(engines, fake_trt, family):
    src, engine_dir = engines[family]
    comp = Compositor.from_pretrained(engine_dir, backend="tensorrt")
    ref = Compositor.from_pretrained(src, device="cpu")
    bg, obj = gradient_background(140, 100), noise_object()
    kw = dict(steps=4, seed=2, progress=False)
    np.testing.assert_array_equal(np.asarray(comp.paste(obj, bg, BOX, **kw).image),
                                  np.asarray(comp.paste(obj, bg, BOX, fidelity=0.0, **kw).image))
    lat_t, lat_e = [], []
    ref.paste(obj, bg, BOX, fidelity=0.5, callback=lambda i, t, x: lat_t.append(x), **kw)
    comp.paste(obj, bg, BOX, fidelity=0.5, callback=lambda i, t, x: lat_e.append(x), **kw)
    assert np.abs(lat_t[-1] - lat_e[-1]).max() <= 1e-3


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_paste_batch_on_engines(engines, fake_trt, family):
    _, engine_dir = engines[family]
    comp = Compositor.from_pretrained(engine_dir, backend="tensorrt")
    jobs = [dict(object=noise_object(seed=i), background=gradient_background(140, 100 + 10 * i), box=BOX, seed=i)
            for i in range(3)]
    jobs.insert(1, dict(object=noise_object(), background=b"\x89PNG broken", box=BOX))  # fails alone
    results = comp.paste_batch(jobs, batch_size=4, steps=2, guidance_end=0.5)
    assert isinstance(results[1], InputError)
    assert_batch_matches_one_by_one(comp, jobs, results, steps=2, guidance_end=0.5)
