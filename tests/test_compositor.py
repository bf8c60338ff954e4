"""Compositor.paste end to end on the tiny model: the background guarantee, determinism, kinds, errors."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from PIL import Image

from composekit import CompositeResult, InputError

FAST = dict(steps=2, guidance=3.0, progress=False)


def _outside_equal(result_image, bg_array, mask):
    out = np.asarray(result_image)
    assert out.shape == bg_array.shape and out.dtype == bg_array.dtype
    np.testing.assert_array_equal(out[~mask], bg_array[~mask])


@pytest.mark.parametrize(
    "size,box",
    [
        ((64, 64), (10, 20, 40, 50)),  # the model's size: no crop, no resize
        ((100, 37), (3, 5, 61, 33)),  # non-multiples of 8
        ((517, 301), (200, 100, 333, 250)),
        ((4000, 3000), (1800, 1200, 2300, 1900)),  # large
        ((1000, 6), (100, 0, 700, 6)),  # very thin, wide
        ((7, 900), (0, 400, 7, 480)),  # very thin, tall
        ((9, 9), (0, 0, 9, 9)),  # tiny, whole image
        ((640, 480), (0, 0, 640, 480)),  # whole background
    ],
)
def test_background_outside_region_is_bit_identical(compositor, size, box):
    bg = gradient_background(*size)
    obj = noise_object()
    bg_copy, obj_copy = bg.copy(), obj.copy()
    result = compositor.paste(obj, bg, box, seed=0, **FAST)
    assert isinstance(result, CompositeResult)
    assert result.image.size == bg.size and result.image.mode == "RGB"
    x0, y0, x1, y1 = box
    assert not result.mask[:y0].any() and not result.mask[y1:].any()
    assert not result.mask[:, :x0].any() and not result.mask[:, x1:].any()
    _outside_equal(result.image, np.asarray(bg), result.mask)
    # Something was generated inside, and the caller's images are untouched.
    assert (np.asarray(result.image)[result.mask] != np.asarray(bg)[result.mask]).any()
    assert np.array_equal(np.asarray(bg), np.asarray(bg_copy)) and np.array_equal(np.asarray(obj), np.asarray(obj_copy))


def test_same_seed_same_output_different_seed_differs(compositor):
    bg, obj = gradient_background(200, 150), noise_object()
    a = compositor.paste(obj, bg, (50, 40, 150, 120), seed=7, **FAST)
    b = compositor.paste(obj, bg, (50, 40, 150, 120), seed=7, **FAST)
    c = compositor.paste(obj, bg, (50, 40, 150, 120), seed=8, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.seed == 7 and c.seed == 8


def test_no_seed_draws_one_and_reports_it(compositor):
    bg, obj = gradient_background(64, 64), noise_object()
    r = compositor.paste(obj, bg, (8, 8, 40, 40), **FAST)
    again = compositor.paste(obj, bg, (8, 8, 40, 40), seed=r.seed, **FAST)
    assert np.array_equal(np.asarray(r.image), np.asarray(again.image))


def test_eta_uses_seeded_cpu_noise(compositor):
    bg, obj = gradient_background(64, 64), noise_object()
    a = compositor.paste(obj, bg, (8, 8, 40, 40), seed=1, eta=1.0, **FAST)
    b = compositor.paste(obj, bg, (8, 8, 40, 40), seed=1, eta=1.0, **FAST)
    c = compositor.paste(obj, bg, (8, 8, 40, 40), seed=1, eta=0.0, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_numpy_in_numpy_out_and_input_untouched(compositor):
    bg = np.asarray(gradient_background(120, 90)).copy()
    obj = np.asarray(noise_object()).copy()
    bg_before, obj_before = bg.copy(), obj.copy()
    r = compositor.paste(obj, bg, (10, 10, 60, 70), seed=0, **FAST)
    assert isinstance(r.image, np.ndarray) and r.image.shape == bg.shape and r.image.dtype == np.uint8
    _outside_equal(r.image, bg, r.mask)
    np.testing.assert_array_equal(bg, bg_before)
    np.testing.assert_array_equal(obj, obj_before)


def test_rgba_background_keeps_its_alpha_and_l_stays_l(compositor):
    rgba = gradient_background(100, 80).convert("RGBA")
    alpha = np.random.default_rng(0).integers(0, 256, (80, 100), dtype=np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    r = compositor.paste(noise_object(), rgba, (20, 20, 70, 60), seed=0, **FAST)
    assert r.image.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(r.image)[..., 3], alpha)
    _outside_equal(r.image, np.asarray(rgba), r.mask)

    gray = gradient_background(100, 80).convert("L")
    r = compositor.paste(noise_object(), gray, (20, 20, 70, 60), seed=0, **FAST)
    assert r.image.mode == "L"
    _outside_equal(r.image, np.asarray(gray), r.mask)


def test_paths_and_bytes_are_accepted(compositor, tmp_path):
    bg, obj = gradient_background(90, 70), noise_object()
    bg.save(tmp_path / "bg.png")
    buf = io.BytesIO()
    obj.save(buf, format="PNG")
    r = compositor.paste(buf.getvalue(), tmp_path / "bg.png", (10, 10, 50, 50), seed=0, **FAST)
    ref = compositor.paste(obj, bg, (10, 10, 50, 50), seed=0, **FAST)
    assert isinstance(r.image, Image.Image)
    assert np.array_equal(np.asarray(r.image), np.asarray(ref.image))


def test_rgba_cutout_object(compositor):
    obj = noise_object(60, 60).convert("RGBA")
    a = np.zeros((60, 60), np.uint8)
    a[10:50, 20:40] = 255
    obj.putalpha(Image.fromarray(a))
    r = compositor.paste(obj, gradient_background(64, 64), (8, 8, 56, 56), seed=0, **FAST)
    assert r.image.size == (64, 64)


def test_fully_transparent_object_is_an_error(compositor):
    obj = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    with pytest.raises(InputError, match="transparent"):
        compositor.paste(obj, gradient_background(64, 64), (8, 8, 40, 40), seed=0, **FAST)


def test_mask_region(compositor):
    bg = gradient_background(150, 100)
    m = np.zeros((100, 150), np.uint8)
    yy, xx = np.mgrid[0:100, 0:150]
    m[(xx - 75) ** 2 + (yy - 50) ** 2 < 30**2] = 255
    r = compositor.paste(noise_object(), bg, mask=Image.fromarray(m), seed=0, feather=0, **FAST)
    ys, xs = np.nonzero(m)
    assert r.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert not (r.mask & (m == 0)).any()  # only masked pixels may change
    _outside_equal(r.image, np.asarray(bg), r.mask)
    assert r.mask.sum() == (m > 0).sum()  # with feather=0 the whole mask is generated


def test_callback_sees_every_step(compositor):
    seen = []
    compositor.paste(noise_object(), gradient_background(64, 64), (8, 8, 40, 40), seed=0, steps=3,
                     progress=False, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1]
    assert seen[0][2] == (1, 4, 8, 8)


def test_result_is_frozen_and_timed(compositor):
    r = compositor.paste(noise_object(), gradient_background(64, 64), (8, 8, 40, 40), seed=0, **FAST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seed = 3  # type: ignore[misc]
    for stage in ("encode_object", "encode_image", "denoise", "decode", "paste", "total"):
        assert r.timings[stage] >= 0
    with pytest.raises(TypeError):
        r.timings["total"] = 0  # type: ignore[index]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(eta=-1.0), "eta"),
        (dict(seed=-1), "seed"),
        (dict(seed="x"), "seed"),
        (dict(feather=-2), "feather"),
        (dict(context=0.5), "context"),
        (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "latents"),
    ],
)
def test_bad_options_are_input_errors(compositor, kwargs, match):
    bg, obj = gradient_background(64, 64), noise_object()
    before = np.asarray(bg).copy()
    opts = dict(FAST, seed=0)
    opts.update(kwargs)
    with pytest.raises(InputError, match=match):
        compositor.paste(obj, bg, (8, 8, 40, 40), **opts)
    np.testing.assert_array_equal(np.asarray(bg), before)


@pytest.mark.parametrize(
    "args",
    [
        dict(box=None),
        dict(box=(0, 0, 65, 10)),
        dict(box=(10, 10, 5, 5)),
        dict(box=None, mask=np.zeros((64, 64), np.uint8)),
        dict(box=None, mask=np.full((32, 64), 255, np.uint8)),
        dict(box=(0, 0, 8, 8), mask=np.full((64, 64), 255, np.uint8)),
    ],
)
def test_bad_regions_are_input_errors(compositor, args):
    bg, obj = gradient_background(64, 64), noise_object()
    before = np.asarray(bg).copy(), np.asarray(obj).copy()
    mask_before = np.array(args["mask"], copy=True) if "mask" in args else None
    with pytest.raises(InputError):
        compositor.paste(obj, bg, seed=0, **args, **FAST)
    np.testing.assert_array_equal(np.asarray(bg), before[0])
    np.testing.assert_array_equal(np.asarray(obj), before[1])
    if mask_before is not None:
        np.testing.assert_array_equal(args["mask"], mask_before)


@pytest.mark.parametrize(
    "bad", [None, 3, "does/not/exist.png", b"not an image", np.zeros((4, 4, 2), np.uint8),
            np.full((4, 4), 2.0, np.float32), np.zeros((4, 4), np.int32)]
)
def test_bad_images_are_input_errors(compositor, bad):
    obj = noise_object()
    before = np.asarray(obj).copy()
    bad_before = np.array(bad, copy=True) if isinstance(bad, np.ndarray) else bad
    with pytest.raises(InputError):
        compositor.paste(obj, bad, (0, 0, 2, 2), seed=0, **FAST)
    np.testing.assert_array_equal(np.asarray(obj), before)
    if isinstance(bad, np.ndarray):
        np.testing.assert_array_equal(bad, bad_before)


def test_repr_names_model_backend_device(compositor):
    text = repr(compositor)
    assert "torch" in text and "cpu" in text and "float32" in text and "paint_by_example" in text


def test_threads_share_one_compositor(compositor):
    from concurrent.futures import ThreadPoolExecutor

    bg, obj = gradient_background(120, 100), noise_object()
    jobs = [(seed, (10 + seed, 10, 70 + seed, 80)) for seed in range(8)]
    serial = [np.asarray(compositor.paste(obj, bg, box, seed=seed, **FAST).image) for seed, box in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(compositor.paste, obj, bg, box, seed=seed, **FAST) for seed, box in jobs * 2]
        parallel = [np.asarray(f.result().image) for f in futures]
    for i, got in enumerate(parallel):
        np.testing.assert_array_equal(got, serial[i % len(jobs)])


def test_guidance_end_cuts_guidance_and_defaults_to_the_reference(compositor):
    bg, obj = gradient_background(64, 64), noise_object()
    kw = dict(seed=4, steps=4, progress=False)
    calls = []
    real = compositor.backend.unet

    def counting(sample, t, context):
        calls.append(sample.shape[0])
        return real(sample, t, context)

    full = compositor.paste(obj, bg, (8, 8, 40, 40), guidance=4.0, **kw)
    same = compositor.paste(obj, bg, (8, 8, 40, 40), guidance=4.0, guidance_end=1.0, **kw)
    assert np.array_equal(np.asarray(full.image), np.asarray(same.image))
    unguided = compositor.paste(obj, bg, (8, 8, 40, 40), guidance=1.0, **kw)
    compositor.backend.unet = counting
    try:
        cut = compositor.paste(obj, bg, (8, 8, 40, 40), guidance=4.0, guidance_end=0.5, **kw)
        none = compositor.paste(obj, bg, (8, 8, 40, 40), guidance=4.0, guidance_end=0.0, **kw)
    finally:
        del compositor.backend.unet
    assert calls == [2, 2, 1, 1] + [1, 1, 1, 1]  # batch 2 while guided, then one conditional pass
    assert np.array_equal(np.asarray(none.image), np.asarray(unguided.image))
    assert not np.array_equal(np.asarray(cut.image), np.asarray(full.image))
    with pytest.raises(InputError, match="guidance_end"):
        compositor.paste(obj, bg, (8, 8, 40, 40), guidance_end=1.5, **kw)


def test_object_context_is_cached_across_calls(compositor):
    bg, obj = gradient_background(64, 64), noise_object(50, 60, seed=99)
    encoded = []
    inner = compositor.backend.inner  # the compositor's backend is a ContextCache around the loaded one
    real = inner.encode_object
    inner.encode_object = lambda pixels: encoded.append(1) or real(pixels)
    try:
        a = compositor.paste(obj, bg, (8, 8, 40, 40), seed=1, **FAST)
        b = compositor.paste(obj, bg, (16, 16, 48, 48), seed=2, **FAST)
        c = compositor.paste(noise_object(50, 60, seed=100), bg, (8, 8, 40, 40), seed=1, **FAST)
    finally:
        del inner.encode_object
    assert len(encoded) == 2  # the second call reused the first call's encoding
    again = compositor.paste(obj, bg, (8, 8, 40, 40), seed=1, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image)) and b.seed == 2
