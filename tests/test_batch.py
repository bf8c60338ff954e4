"""paste_batch / paste_stream: many composites sampled together equal one-by-one paste calls.

Tolerances: latents within 1e-5 relative to their scale in fp32 (max |diff| <= 1e-5 * max(1, max |x|):
the tiny random U-Net's latents reach |x| ~ 6, and batch-size-dependent BLAS rounding then gives up to
1.4e-5 absolute, measured), images within 1/255, the background outside each region bit-identical; a
failing job is returned as its error in place and does not disturb the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gradient_background, noise_object

from composekit import ComposekitError, Compositor, InputError, NumericalError
from composekit.apps.random_models import make_random_model
from composekit.core import sampler
from composekit.core.options import GenerativeOptions
from composekit.formats.images import load_picture

SIZES = [(120, 90), (64, 64), (300, 140), (90, 200), (77, 51)]  # mixed background sizes
BOXES = [(10, 10, 70, 80), (8, 8, 40, 40), (100, 20, 220, 120), (20, 60, 80, 180), (5, 5, 60, 45)]


def _jobs(n=5):
    return [dict(object=noise_object(seed=i), background=gradient_background(*SIZES[i % 5]), box=BOXES[i % 5],
                 seed=100 + i) for i in range(n)]


def _check_equal_to_one_by_one(comp, jobs, results, batch_latents, **opts):
    good = [i for i, r in enumerate(results) if not isinstance(r, ComposekitError)]
    assert len(batch_latents) == len(good)
    for row, i in enumerate(good):
        job, r = jobs[i], results[i]
        seen = []
        one = comp.paste(job["object"], job["background"], job["box"], seed=job["seed"], progress=False,
                         callback=lambda s, t, x: seen.append(x), **opts)
        scale = max(1.0, float(np.abs(seen[-1][0]).max()))
        assert np.abs(seen[-1][0] - batch_latents[row]).max() <= 1e-5 * scale
        a, b = np.asarray(one.image, np.int16), np.asarray(r.image, np.int16)
        assert np.abs(a - b).max() <= 1
        bg = np.asarray(job["background"])
        np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], bg[~r.mask])
        assert r.seed == job["seed"] and r.method == "generative" and r.box == job["box"]


def _batched(comp, jobs, batch_size, **opts):
    latents = []
    last = {}

    def grab(step, t, x):
        last["x"] = x

    stream = comp.paste_stream(jobs, batch_size=batch_size, callback=grab, **opts)
    results = []
    for r in stream:
        results.append(r)
        if "x" in last:  # a batch just finished: keep its final latents
            latents.extend(last.pop("x"))
    return results, latents


def test_batch_equals_one_by_one_with_a_failing_job(compositor):
    jobs = _jobs(5)
    jobs.insert(2, dict(object=noise_object(), background=gradient_background(50, 50), box=(0, 0, 99, 99)))
    jobs.insert(4, dict(object=b"not an image", background=gradient_background(50, 50), box=(0, 0, 9, 9)))
    results, latents = _batched(compositor, jobs, 3, steps=3, guidance_end=0.5)
    assert isinstance(results[2], InputError) and "outside" in str(results[2])
    assert isinstance(results[4], InputError) and "not a readable image" in str(results[4])
    _check_equal_to_one_by_one(compositor, jobs, results, latents, steps=3, guidance_end=0.5)


def test_batch_with_fidelity_and_silhouette(compositor):
    jobs = _jobs(3)
    results, latents = _batched(compositor, jobs, 4, steps=2, fidelity=0.5, eta=0.5)
    _check_equal_to_one_by_one(compositor, jobs, results, latents, steps=2, fidelity=0.5, eta=0.5)


@pytest.mark.parametrize("name", ["mapper", "plain4"])
def test_batch_on_objectstitch_models(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("os-batch")
    model = make_random_model(root / name, "tiny", family="objectstitch", adaptor="mapper",
                              unet_channels=4 if name == "plain4" else 9, seed=3)
    comp = Compositor.from_pretrained(model, device="cpu")
    jobs = _jobs(3)
    jobs.insert(1, dict(object=noise_object(), background=gradient_background(30, 30), box=(0, 0, 40, 40)))
    results, latents = _batched(comp, jobs, 4, steps=3)
    assert isinstance(results[1], InputError)
    _check_equal_to_one_by_one(comp, jobs, results, latents, steps=3)


def test_streaming_reads_lazily_and_bounds_the_batch(compositor):
    pulled = []

    def source():
        for i, job in enumerate(_jobs(5)):
            pulled.append(i)
            yield job

    stream = compositor.paste_stream(source(), batch_size=2, steps=1)
    first = next(stream)
    assert not isinstance(first, ComposekitError)
    assert pulled == [0, 1]  # only the first batch was read
    rest = list(stream)
    assert len(rest) == 4 and pulled == [0, 1, 2, 3, 4]


def test_numerical_error_stays_with_its_job(compositor):
    jobs = _jobs(3)
    bad = np.full((1, 4, 8, 8), np.float32(3e38))  # overflows to inf in the first step
    opts = GenerativeOptions(steps=1)
    prepared = [compositor._prepare(np.asarray(j["background"]), load_picture(j["object"]), j["box"], None, j["seed"],
                                    opts) for j in jobs]
    batch = [p.job for p in prepared]
    batch[1] = sampler.Job(batch[1].window, batch[1].hole, batch[1].object_pixels, 1, latents=bad)
    outs = sampler.sample_batch(compositor.backend, compositor.scheduler, batch,
                                GenerativeOptions(steps=1, progress=False))
    assert isinstance(outs[1], NumericalError)
    assert not isinstance(outs[0], ComposekitError) and not isinstance(outs[2], ComposekitError)


def test_batch_classic_and_bad_calls(compositor):
    jobs = [(noise_object(seed=i), gradient_background(80, 60), (5, 5, 50, 50)) for i in range(3)]
    results = Compositor().paste_batch(jobs)
    for (obj, bg, box), r in zip(jobs, results):
        np.testing.assert_array_equal(np.asarray(r.image), np.asarray(Compositor().paste(obj, bg, box).image))
    with pytest.raises(InputError, match="batch_size"):
        compositor.paste_batch(jobs, batch_size=0)
    with pytest.raises(InputError, match="takes no option"):
        compositor.paste_batch(jobs, seed=3)
    out = compositor.paste_batch([dict(obj=1), 5], steps=1)
    assert all(isinstance(r, InputError) for r in out)


def test_objects_are_encoded_in_one_call_per_batch(tiny_model_dir):
    comp = Compositor.from_pretrained(tiny_model_dir, device="cpu")  # a fresh object cache
    calls = []
    inner = comp.backend.inner  # under the compositor's ContextCache
    real = inner.encode_object
    inner.encode_object = lambda pixels: calls.append(pixels.shape[0]) or real(pixels)
    try:
        jobs = _jobs(3)
        comp.paste_batch(jobs, batch_size=3, steps=1)
        assert calls == [3]  # three different objects, one encoder call
        calls.clear()
        same = [dict(job, object=jobs[0]["object"]) for job in jobs]
        comp.paste_batch(same, batch_size=3, steps=1)
        assert calls == [1]  # one object repeated: encoded once (and now cached)
        comp.paste_batch(same, batch_size=3, steps=1)
        assert calls == [1]
    finally:
        del inner.encode_object
