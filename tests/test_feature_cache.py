"""Feature caching (``cache_interval``): exactness where it must be exact, agreement across backends.

The reference for what caching computes is the DeepCache authors' helper on diffusers' pipeline
(tests/test_parity.py). Here: ``cache_interval=1`` is bit-identical to no option; the shallow pass on the
features of the same step equals the full pass; the exported runtimes equal torch with caching within the
export tolerance (latents 1e-3, as for every graph); batches equal one-by-one pastes; the guidance cut-off
hands the shallow pass the conditional rows; old exports and bad values get clear errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_batch_matches_one_by_one, gradient_background, noise_object

from composekit import Compositor, InputError, ModelError

pytest.importorskip("onnxruntime")
BOX = (20, 10, 100, 80)


def _latents(comp, **options):
    seen = []
    result = comp.paste(noise_object(), gradient_background(140, 100), BOX, seed=3, progress=False,
                        callback=lambda i, t, x: seen.append(x), **options)
    return result, seen


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_interval_one_is_bit_identical_to_no_option(compositor, exported, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    comp = compositor if backend == "torch" else Compositor.from_pretrained(exported["paint_by_example"][1],
                                                                             backend=backend)
    a, seen_a = _latents(comp, steps=4, guidance_end=0.5)
    b, seen_b = _latents(comp, steps=4, guidance_end=0.5, cache_interval=1)
    c, seen_c = _latents(comp, steps=4, guidance_end=0.5, cache_interval=2)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    for x, y in zip(seen_a, seen_b):
        np.testing.assert_array_equal(x, y)
    assert np.abs(seen_a[-1] - seen_c[-1]).max() > 1e-3  # caching does change the result


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_shallow_pass_on_the_same_steps_features_is_the_full_pass(compositor, exported, backend):
    comp = compositor if backend == "torch" else Compositor.from_pretrained(exported["paint_by_example"][1],
                                                                             backend=backend)
    b, info = comp.backend, comp.backend.info
    assert info.feature_cache and info.feature_channels == 32
    rng = np.random.default_rng(0)
    sample = b.asarray(rng.standard_normal((2, info.unet_in_channels, 8, 8), dtype=np.float32))
    context = b.asarray(rng.standard_normal((2, 1, 32), dtype=np.float32))
    plain = b.to_numpy(b.unet(sample, 601, context))
    eps, features = b.unet_with_features(sample, 601, context)
    assert b.to_numpy(features).shape == (2, 32, 8, 8)
    shallow = b.to_numpy(b.unet_shallow(sample, 601, context, features))
    np.testing.assert_array_equal(b.to_numpy(eps), plain)
    assert np.abs(shallow - plain).max() <= (0 if backend == "torch" else 1e-5)
    other = b.to_numpy(b.unet_shallow(sample, 601, context, b.asarray(rng.standard_normal((2, 32, 8, 8),
                                                                                          dtype=np.float32))))
    assert np.abs(other - plain).max() > 1e-2  # the features matter


def test_guidance_cut_off_hands_the_shallow_pass_the_conditional_rows(compositor, monkeypatch):
    backend = compositor.backend.inner if hasattr(compositor.backend, "inner") else compositor.backend
    calls = []
    full, shallow = backend.unet_with_features, backend.unet_shallow

    def spy_full(sample, t, context):
        eps, features = full(sample, t, context)
        calls.append(("full", sample.shape[0], backend.to_numpy(features)))
        return eps, features

    def spy_shallow(sample, t, context, features):
        calls.append(("shallow", sample.shape[0], backend.to_numpy(features)))
        return shallow(sample, t, context, features)

    monkeypatch.setattr(backend, "unet_with_features", spy_full)
    monkeypatch.setattr(backend, "unet_shallow", spy_shallow)
    result, _ = _latents(compositor, steps=6, guidance_end=0.5, cache_interval=4)
    # Steps 0-2 guided (batch 2), 3-5 not; a full pass at steps 0 and 4.
    assert [(kind, rows) for kind, rows, _ in calls] == [("full", 2), ("shallow", 2), ("shallow", 2),
                                                          ("shallow", 1), ("full", 1), ("shallow", 1)]
    np.testing.assert_array_equal(calls[3][2], calls[0][2][1:])  # guidance ended: the conditional row
    np.testing.assert_array_equal(calls[5][2], calls[4][2])


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_exported_runtimes_match_torch_with_caching(exported, family):
    src, export = exported[family]
    torch_comp = Compositor.from_pretrained(src, device="cpu")
    options = dict(steps=6, guidance_end=0.7, cache_interval=3)
    ref, ref_seen = _latents(torch_comp, **options)
    runtimes = ["onnxruntime"] + (["openvino"] if _has("openvino") else [])
    for runtime in runtimes:
        comp = Compositor.from_pretrained(export, backend=runtime, **({"precision": "f32"} if runtime == "openvino"
                                                                      else {}))
        got, seen = _latents(comp, **options)
        assert np.abs(seen[-1] - ref_seen[-1]).max() <= 1e-3, runtime
        assert np.abs(np.asarray(got.image, np.int16) - np.asarray(ref.image, np.int16)).max() <= 2, runtime


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_batches_several_objects_fidelity_and_region_decode(compositor):
    jobs = [dict(object=noise_object(seed=s), background=gradient_background(120, 90), box=(10 + s, 10, 70, 80),
                 seed=s) for s in range(3)]
    options = dict(steps=4, cache_interval=2, guidance_end=0.5, fidelity=0.5, decode="region")
    results = list(compositor.paste_batch(jobs, batch_size=3, progress=False, **options))
    assert all(not isinstance(r, Exception) for r in results)
    assert_batch_matches_one_by_one(compositor, jobs, results, **options)
    bg = gradient_background(160, 100)
    two = compositor.paste([noise_object(seed=1), noise_object(seed=2)], bg, [(10, 10, 60, 70), (90, 20, 150, 90)],
                           steps=3, seed=5, cache_interval=2, progress=False)
    np.testing.assert_array_equal(np.asarray(two.image)[~two.mask], np.asarray(bg)[~two.mask])


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None])
def test_bad_intervals_are_refused(compositor, value):
    with pytest.raises(InputError, match="cache_interval"):
        compositor.paste(noise_object(), gradient_background(64, 64), (0, 0, 32, 32), cache_interval=value)


def test_exports_without_the_shallow_graph(exported, tmp_path):
    export = tmp_path / "old"
    shutil.copytree(exported["paint_by_example"][1], export)
    manifest = json.loads((export / "manifest.json").read_text())
    shallow = manifest["components"].pop("unet_shallow")
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="feature_channels .* unet_shallow"):
        Compositor.from_pretrained(export, backend="onnxruntime")
    # Without feature_channels the U-Net graph's features output contradicts the spec: refused at load.
    manifest["dims"].pop("feature_channels")
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="features"):
        Compositor.from_pretrained(export, backend="onnxruntime")
    # An export made before feature caching (its U-Net graph has no features output, no shallow graph) loads
    # and pastes without caching, and says how to get it.
    import onnx

    from composekit.formats.export_manifest import sha256_file

    graph = onnx.load(str(export / "unet.onnx"))
    kept = [o for o in graph.graph.output if o.name != "features"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(export / "unet.onnx"))
    manifest["components"]["unet"]["sha256"] = sha256_file(export / "unet.onnx")
    manifest["components"]["unet"]["outputs"] = manifest["components"]["unet"]["outputs"][:1]
    (export / "manifest.json").write_text(json.dumps(manifest))
    comp = Compositor.from_pretrained(export, backend="onnxruntime")
    assert not comp.backend.info.feature_cache
    comp.paste(noise_object(), gradient_background(64, 64), (0, 0, 32, 32), steps=2, progress=False)
    with pytest.raises(InputError, match="cache_interval=3 needs .* Re-export"):
        comp.paste(noise_object(), gradient_background(64, 64), (0, 0, 32, 32), cache_interval=3, progress=False)
    assert shallow["file"] == "unet_shallow.onnx"


def test_cli_flag(tiny_model_dir, tmp_path):
    bg = gradient_background(64, 64)
    bg.save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "a.png")
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "composekit", "paste", tmp_path / "a.png", tmp_path / "bg.png",
                           "--box", "8,8,40,40", "-o", out, "--model", tiny_model_dir, "--steps", "3", "--seed", "2",
                           "--cache-interval", "2", "--device", "cpu", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    direct = Compositor.from_pretrained(tiny_model_dir, device="cpu").paste(
        tmp_path / "a.png", bg, (8, 8, 40, 40), steps=3, seed=2, cache_interval=2, progress=False)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(direct.image))
    proc = subprocess.run([sys.executable, "-m", "composekit", "paste", tmp_path / "a.png", tmp_path / "bg.png",
                           "--box", "8,8,40,40", "-o", out, "--model", tiny_model_dir, "--cache-interval", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cache_interval" in proc.stderr.replace("-", "_")


def test_speed_fast_is_caching_at_three_unless_told_otherwise(compositor):
    from composekit import GenerativeOptions

    assert GenerativeOptions(speed="fast").cache_interval == 3
    assert GenerativeOptions(speed="fast", cache_interval=5).cache_interval == 5
    assert GenerativeOptions().cache_interval == 1 and GenerativeOptions().speed == "default"
    fast, _ = _latents(compositor, steps=4, speed="fast")
    three, _ = _latents(compositor, steps=4, cache_interval=3)
    np.testing.assert_array_equal(np.asarray(fast.image), np.asarray(three.image))  # torch: no tiny decoder loaded
    with pytest.raises(InputError, match="speed"):
        compositor.paste(noise_object(), gradient_background(64, 64), (0, 0, 32, 32), speed="turbo")
