"""Token downsampling (``token_downsampling=N``): the method's subsampling, exact where it must be, and the
same function in torch and in the exported graphs.

References: diffusers' own attention processor (on tokens that are constant over each N x N cell block,
subsampling the keys and values loses nothing, so the result must equal full attention) and torch's
``interpolate(mode="nearest-exact")``, the downsampling the method's reference implementation uses.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_batch_matches_one_by_one, gradient_background, noise_object

from composekit import Compositor, InputError, ModelError
from composekit.backends.token_downsampling import SubsampledSelfAttention

BOX = (20, 10, 100, 80)


def _attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(32, heads=2, dim_head=16).eval()


@torch.no_grad()
def test_exact_on_tokens_constant_over_each_block():
    attn = _attention()
    cells = torch.randn(2, 4, 4, 32)
    tokens = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 32)  # constant per 2x2 block
    reference = attn(tokens)  # diffusers' processor, every key
    fast = copy.deepcopy(attn)
    fast.set_processor(SubsampledSelfAttention(fast.processor, 8, 8, 2))
    np.testing.assert_allclose(fast(tokens).numpy(), reference.numpy(), atol=1e-6)
    other = torch.randn(2, 64, 32)  # on general tokens it is an approximation, not a no-op
    assert (fast(other) - attn(other)).abs().max() > 1e-3


@pytest.mark.parametrize(("factor", "height", "width"), [(2, 8, 8), (4, 8, 16), (3, 6, 9)])
@torch.no_grad()
def test_keys_are_torchs_nearest_exact_downsampling(factor, height, width):
    seen = []

    def spy(attn, hidden, keys, mask, temb, **kwargs):
        seen.append(keys)
        return hidden

    tokens = torch.randn(2, height * width, 32)
    SubsampledSelfAttention(spy, height, width, factor)(None, tokens)
    grid = tokens.reshape(2, height, width, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(height // factor, width // factor), mode="nearest-exact")
    np.testing.assert_array_equal(seen[0].numpy(), expected.permute(0, 2, 3, 1).reshape(2, -1, 32).numpy())


def _paste(comp, **options):
    seen = []
    options = {"steps": 4, **options}
    result = comp.paste(noise_object(), gradient_background(140, 100), BOX, seed=3, progress=False,
                        callback=lambda i, t, x: seen.append(x), **options)
    return result, seen


def test_factor_one_is_bit_identical_and_two_changes_only_the_region(tiny_model_dir, compositor):
    one = Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=1)
    two = Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=2)
    assert one.backend.info.token_downsampling == 1 and two.backend.info.token_downsampling == 2
    assert "token downsampling 2x" in two.backend.describe()
    a, seen_a = _paste(compositor)
    b, seen_b = _paste(one)
    c, seen_c = _paste(two)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    for x, y in zip(seen_a, seen_b):
        np.testing.assert_array_equal(x, y)
    assert np.abs(seen_c[-1] - seen_a[-1]).max() > 1e-3
    bg = np.asarray(gradient_background(140, 100))
    np.testing.assert_array_equal(np.asarray(c.image)[~c.mask], bg[~c.mask])


def test_composes_with_caching_batches_and_several_objects(tiny_model_dir):
    comp = Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=2)
    jobs = [{"object": noise_object(seed=s), "background": gradient_background(120, 90), "box": (10 + s, 10, 70, 80),
             "seed": s} for s in range(2)]
    options = {"steps": 4, "cache_interval": 2, "guidance_end": 0.5, "fidelity": 0.5}
    results = list(comp.paste_batch(jobs, batch_size=2, progress=False, **options))
    assert all(not isinstance(r, Exception) for r in results)
    assert_batch_matches_one_by_one(comp, jobs, results, **options)


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
def test_exported_graphs_equal_torch(exported, tmp_path, family):
    pytest.importorskip("onnxruntime")
    from composekit_export.cli import main as export_main

    src = exported[family][0]
    out = tmp_path / "todo2"
    assert export_main(["onnx", str(src), str(out), "--token-downsampling", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["token_downsampling"] == 2
    ref_comp = Compositor.from_pretrained(src, device="cpu", token_downsampling=2)
    plain_comp = Compositor.from_pretrained(src, device="cpu")
    for options in ({}, {"cache_interval": 3, "steps": 6, "guidance_end": 0.7}):
        ref, ref_seen = _paste(ref_comp, **options)
        _, plain_seen = _paste(plain_comp, **options)
        runtimes = ["onnxruntime"] + (["openvino"] if _has("openvino") else [])
        for runtime in runtimes:
            comp = Compositor.from_pretrained(out, backend=runtime,
                                              **({"precision": "f32"} if runtime == "openvino" else {}))
            assert comp.backend.info.token_downsampling == 2 and "token downsampling 2x" in comp.backend.describe()
            got, seen = _paste(comp, **options)
            assert np.abs(seen[-1] - ref_seen[-1]).max() <= 1e-3, (runtime, options)
            assert np.abs(seen[-1] - plain_seen[-1]).max() > 1e-3  # the graphs do downsample
            assert np.abs(np.asarray(got.image, np.int16) - np.asarray(ref.image, np.int16)).max() <= 2


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("value", [0, 5, -1, 2.5, "2", True])
def test_bad_factors_are_refused(tiny_model_dir, value):
    with pytest.raises(InputError, match="token_downsampling"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=value)


def test_a_factor_that_does_not_divide_the_latent_names_those_that_do(tiny_model_dir):
    with pytest.raises(InputError, match=r"does not divide the model's 8 x 8 latent; use 2, 4"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=3)


def test_exports_refuse_it_at_load_and_with_dynamic_shapes(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    from composekit_export.onnx_export import export_onnx

    src, export = exported["paint_by_example"]
    with pytest.raises(InputError, match="traced in at export"):
        Compositor.from_pretrained(export, backend="onnxruntime", token_downsampling=2)
    with pytest.raises(InputError, match="dynamic-spatial"):
        export_onnx(src, tmp_path / "dyn", dynamic_spatial=True, token_downsampling=2)
    assert not (tmp_path / "dyn").exists()
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    data = json.loads((bad / "manifest.json").read_text())
    assert "token_downsampling" in data and data["token_downsampling"] == 1
    data["token_downsampling"] = 9
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="token_downsampling"):
        Compositor.from_pretrained(bad, backend="onnxruntime")
    del data["token_downsampling"]  # an export made before the option: none
    (bad / "manifest.json").write_text(json.dumps(data))
    assert Compositor.from_pretrained(bad, backend="onnxruntime").backend.info.token_downsampling == 1


def test_cli_flag(tiny_model_dir, tmp_path):
    from composekit.apps.cli import main

    out = tmp_path / "out.png"
    bg, obj = tmp_path / "bg.png", tmp_path / "obj.png"
    gradient_background(96, 80).save(bg)
    noise_object().save(obj)
    args = ["paste", str(obj), str(bg), "--box", "10,10,70,70", "--model", str(tiny_model_dir), "--device", "cpu",
            "--steps", "2", "--quiet", "-o", str(out)]
    assert main([*args, "--token-downsampling", "2"]) == 0 and out.exists()
    assert main(["paste", str(obj), str(bg), "--box", "10,10,70,70", "-o", str(tmp_path / "c.png"),
                 "--token-downsampling", "2"]) != 0  # a model flag without --model


def test_tensorrt_engines_built_from_such_an_export_equal_torch(tiny_model_dir, tmp_path, monkeypatch):
    """The TensorRT backend against its stand-in (tests/fake_tensorrt.py; no machine here has TensorRT): the
    engine directory carries the export's factor, and its engines compute what torch with the option does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import fake_tensorrt
    from composekit_export.onnx_export import export_onnx
    from fake_tensorrt import FAKE_GPU, build_fake_engines

    from composekit.backends import tensorrt_backend
    from composekit.backends.arrays import ArrayModule

    monkeypatch.setattr(tensorrt_backend, "_runtime_environment",
                        lambda device: (fake_tensorrt, ArrayModule("cpu"), FAKE_GPU))
    export_onnx(tiny_model_dir, tmp_path / "onnx", token_downsampling=2)
    build_fake_engines(tmp_path / "onnx", tmp_path / "engines")
    comp = Compositor.from_pretrained(tmp_path / "engines", backend="tensorrt")
    assert comp.backend.info.token_downsampling == 2 and "token downsampling 2x" in comp.backend.describe()
    ref_comp = Compositor.from_pretrained(tiny_model_dir, device="cpu", token_downsampling=2)
    for options in ({}, {"cache_interval": 3, "steps": 6, "guidance_end": 0.7}):
        ref, ref_seen = _paste(ref_comp, **options)
        got, seen = _paste(comp, **options)
        assert np.abs(seen[-1] - ref_seen[-1]).max() <= 1e-3, options
        assert np.abs(np.asarray(got.image, np.int16) - np.asarray(ref.image, np.int16)).max() <= 2
