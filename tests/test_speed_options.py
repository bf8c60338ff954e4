"""Speed options of the PyTorch backend and the sampler's no-transfer loop, checked on the CPU.

The speed itself is measured by ``benchmarks/`` (on a GPU where one is available); these tests
check that each option computes the same function as the plain backend, within a stated tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gradient_background, noise_object

from composekit import Compositor, InputError
from composekit.apps.random_models import make_random_model
from composekit.core.options import GenerativeOptions

BOX = (20, 10, 100, 80)


def _latents(comp, **kw):
    out = []
    comp.paste(noise_object(), gradient_background(140, 100), BOX, steps=4, seed=3, progress=False,
               callback=lambda i, t, x: out.append(x), **kw)
    return out[-1]


def test_channels_last_computes_the_same_function(tiny_model_dir, compositor):
    nhwc = Compositor.from_pretrained(tiny_model_dir, device="cpu", channels_last=True)
    assert "channels_last" in nhwc.backend.describe() and "channels_last" not in compositor.backend.describe()
    # Same weights, another memory layout: only the summation order of the convolutions changes.
    assert np.abs(_latents(nhwc) - _latents(compositor)).max() <= 1e-4


@pytest.mark.slow  # torch.compile of even the tiny U-Net takes a minute or more on two CPU cores
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])  # on the CPU the latter compiles without CUDA graphs
def test_compiled_unet_computes_the_same_function(tiny_model_dir, compositor, mode):
    compiled = Compositor.from_pretrained(tiny_model_dir, device="cpu", compile=mode)
    assert "compiled" in compiled.backend.describe()
    assert np.abs(_latents(compiled) - _latents(compositor)).max() <= 1e-4
    # Feature caching on the compiled U-Net: its full pass still yields the deep features (a hook inside the
    # compiled module) and the shallow pass reuses them, as without compiling.
    cached = _latents(compositor, cache_interval=2)
    assert np.abs(cached - _latents(compositor)).max() > 1e-3  # caching changes the result: the check can fail
    assert np.abs(_latents(compiled, cache_interval=2) - cached).max() <= 1e-4


def test_speed_option_errors(tiny_model_dir):
    with pytest.raises(InputError, match="compile must be"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", compile="fastest")
    with pytest.raises(InputError, match="channels_last must be"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", channels_last="yes")


class SpyBackend:
    """Delegates to a real backend and records which of its methods the sampler calls, in order."""

    def __init__(self, inner):
        self._inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return recorded


@pytest.mark.parametrize("family", ["paint_by_example", "objectstitch"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_loop_makes_no_host_device_copies(tiny_model_dir, tmp_path, family, eta):
    # On CUDA each host->device copy or device->host read synchronises the host with the GPU; the step loop
    # must do neither (noise is drawn up front), so it only queues U-Net calls and device arithmetic.
    src = tiny_model_dir if family == "paint_by_example" else make_random_model(
        tmp_path / "os", "tiny", family="objectstitch", adaptor="conv1d", seed=4)
    comp = Compositor.from_pretrained(src, device="cpu")
    spy = SpyBackend(comp.backend)
    plain = comp.paste(noise_object(), gradient_background(140, 100), BOX, steps=5, seed=3, eta=eta, progress=False)
    spied = Compositor(spy, comp.scheduler, comp.preprocessor, comp.backdrop).paste(
        noise_object(), gradient_background(140, 100), BOX, steps=5, seed=3, eta=eta, progress=False)
    np.testing.assert_array_equal(np.asarray(plain.image), np.asarray(spied.image))
    first, last = spy.calls.index("unet"), len(spy.calls) - 1 - spy.calls[::-1].index("unet")
    assert spy.calls.count("unet") == 5
    assert set(spy.calls[first:last + 1]) <= {"unet", "cat"}, spy.calls


def test_region_decode_decodes_only_the_hole_plus_margin(tiny_model_dir, monkeypatch):
    from composekit.core import sampler

    monkeypatch.setattr(sampler, "REGION_MARGIN", 1)  # the tiny model's 8x8 latent: leave cells outside
    comp = Compositor.from_pretrained(tiny_model_dir, device="cpu")
    spy = SpyBackend(comp.backend)
    decoded = []
    inner_decode = comp.backend.decode
    spy.decode = lambda x, tiny=False: decoded.append(x.shape) or inner_decode(x, tiny=tiny)
    m, f = comp.backend.info.model_size, comp.backend.info.vae_scale_factor
    rng = np.random.default_rng(0)
    window = rng.integers(0, 256, (m, m, 3), dtype=np.uint8)
    hole = np.zeros((m, m), np.float32)
    hole[16:32, 24:40] = 1  # latent rows 2..3, columns 3..4
    before = window.copy()
    opts = GenerativeOptions(steps=2, progress=False, decode="region")
    pixels = comp.preprocessor(np.asarray(noise_object()))
    out = sampler.sample_batch(spy, comp.scheduler, [sampler.Job(window, hole, pixels, 0)], opts)[0]
    np.testing.assert_array_equal(window, before)  # the caller's window is not written
    assert decoded == [(1, 4, 4, 4)]  # rows 1..4, columns 2..5 (hole +- 1 cell)
    y0, y1, x0, x1 = 1 * f, 5 * f, 2 * f, 6 * f
    outside = np.ones((m, m), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out.image[outside], window[outside])  # never decoded, never pasted
    # inside the crop: exactly the decoder's output for the crop of the final latents
    crop = comp.backend.decode(comp.backend.asarray(out.latents[:, :, 1:5, 2:6]))
    expect = np.rint(np.clip(comp.backend.to_numpy(crop)[0] / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out.image[y0:y1, x0:x1], expect.transpose(1, 2, 0))


def test_region_decode_through_paste_keeps_the_background(compositor):
    bg = gradient_background(140, 100)
    r = compositor.paste(noise_object(), bg, BOX, steps=2, seed=0, progress=False, decode="region")
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])
    with pytest.raises(InputError, match="decode must be"):
        compositor.paste(noise_object(), bg, BOX, steps=2, seed=0, progress=False, decode="tiles")
