"""The tiny-autoencoder option (``vae=``): random AutoencoderTiny models in TAESD's layout, on the torch
backend against diffusers' own AutoencoderTiny, and as an exported component on ONNX Runtime and
OpenVINO. Its images are the tiny decoder's, not the VAE's: the tests check that it is the tiny
decoder that runs, that it matches its reference, and that the background stays exact."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import gradient_background, noise_object

from composekit import Compositor, InputError, ModelError, ModelNotFoundError
from composekit.apps.random_models import make_random_tiny_vae

BOX = (20, 10, 100, 80)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return make_random_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd", "tiny", seed=3)


def test_torch_backend_decodes_with_the_tiny_vae(tiny_model_dir, taesd):
    from diffusers import AutoencoderTiny

    plain = Compositor.from_pretrained(tiny_model_dir, device="cpu")
    tiny = Compositor.from_pretrained(tiny_model_dir, device="cpu", vae=taesd)
    assert "tiny VAE decoder" in tiny.backend.describe()
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    reference = AutoencoderTiny.from_pretrained(taesd).eval()
    with torch.no_grad():
        want = reference.decode(torch.from_numpy(latents)).sample.numpy()  # diffusers' own decode
    got = tiny.backend.to_numpy(tiny.backend.decode(tiny.backend.asarray(latents)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    bg, obj = gradient_background(140, 100), noise_object()
    a = plain.paste(obj, bg, BOX, steps=2, seed=1, progress=False)
    b = tiny.paste(obj, bg, BOX, steps=2, seed=1, progress=False)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))  # another decoder ran
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])


def test_tiny_vae_errors(tiny_model_dir, taesd, tmp_path):
    with pytest.raises(ModelError, match="not an AutoencoderTiny"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", vae=tiny_model_dir / "vae")  # an AutoencoderKL
    with pytest.raises(ModelNotFoundError):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", vae=tmp_path / "missing" / "x", local_files_only=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((taesd / "config.json").read_text())
    with pytest.raises(ModelError, match="safetensors"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", vae=broken)


def test_cli_make_model_and_paste_with_vae(tiny_model_dir, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "composekit", *map(str, args)], capture_output=True, text=True)

    made = cli("make-model", "tiny", tmp_path / "tv", "--tiny-vae")
    assert made.returncode == 0 and "AutoencoderTiny" in made.stdout, made.stderr
    gradient_background(120, 90).save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "obj.png")
    run = cli("paste", tmp_path / "obj.png", tmp_path / "bg.png", "--box", "10,10,60,60", "-o", tmp_path / "o.png",
              "--model", tiny_model_dir, "--vae", tmp_path / "tv", "--steps", 1, "--device", "cpu")
    assert run.returncode == 0 and (tmp_path / "o.png").exists(), run.stderr


@pytest.mark.parametrize("backend", ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else []))
def test_exported_tiny_decoder(tiny_model_dir, taesd, tmp_path, backend):
    pytest.importorskip("onnxruntime")
    from composekit_export.onnx_export import export_onnx

    manifest = export_onnx(tiny_model_dir, tmp_path / "e", tiny_vae=taesd)
    assert manifest["components"]["tiny_vae_decoder"]["max_abs_error_vs_torch"] < 1e-4
    extra = {"precision": "f32"} if backend == "openvino" else {}
    torch_tiny = Compositor.from_pretrained(tiny_model_dir, device="cpu", vae=taesd)
    exported = Compositor.from_pretrained(tmp_path / "e", backend=backend, device="cpu", vae="tiny", **extra)
    assert exported.backend.decoder == "tiny_vae_decoder"
    bg, obj = gradient_background(140, 100), noise_object()
    a = torch_tiny.paste(obj, bg, BOX, steps=3, seed=2, progress=False)
    b = exported.paste(obj, bg, BOX, steps=3, seed=2, progress=False)
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2
    np.testing.assert_array_equal(np.asarray(b.image)[~b.mask], np.asarray(bg)[~b.mask])
    # Loaded with no vae=, the export decodes with the VAE, and speed="fast" with its tiny decoder (and caching at 3).
    both = Compositor.from_pretrained(tmp_path / "e", backend=backend, device="cpu", **extra)
    assert both.backend.decoder == "vae_decoder" and both.backend.fast_decoder == "tiny_vae_decoder"
    vae_ref = Compositor.from_pretrained(tiny_model_dir, device="cpu").paste(obj, bg, BOX, steps=3, seed=2,
                                                                              progress=False)
    c = both.paste(obj, bg, BOX, steps=3, seed=2, progress=False)
    assert np.abs(np.asarray(c.image, np.int16) - np.asarray(vae_ref.image, np.int16)).max() <= 2
    fast = both.paste(obj, bg, BOX, steps=3, seed=2, progress=False, speed="fast")
    tiny_cached = exported.paste(obj, bg, BOX, steps=3, seed=2, progress=False, cache_interval=3)
    np.testing.assert_array_equal(np.asarray(fast.image), np.asarray(tiny_cached.image))
    assert np.abs(np.asarray(fast.image, np.int16) - np.asarray(c.image, np.int16)).max() > 2  # not the VAE's
    if backend == "openvino":  # decode="region" with the tiny decoder: the crop decoded as torch decodes it
        from composekit.core import sampler

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sampler, "REGION_MARGIN", 1)  # the tiny model's 8x8 latent: leave cells outside
            big = gradient_background(300, 220)
            crop_ov = exported.paste(obj, big, (30, 20, 110, 90), steps=3, seed=2, progress=False, decode="region")
            crop_pt = torch_tiny.paste(obj, big, (30, 20, 110, 90), steps=3, seed=2, progress=False, decode="region")
        assert any(k[0] == "tiny_vae_decoder" for k in exported.backend._regions)
        assert np.abs(np.asarray(crop_ov.image, np.int16) - np.asarray(crop_pt.image, np.int16)).max() <= 2
    with pytest.raises(InputError, match="vae='tiny'"):
        Compositor.from_pretrained(tmp_path / "e", backend=backend, device="cpu", vae=str(taesd), **extra)
    export_onnx(tiny_model_dir, tmp_path / "plain")
    with pytest.raises(InputError, match="no tiny decoder"):
        Compositor.from_pretrained(tmp_path / "plain", backend=backend, device="cpu", vae="tiny", **extra)
