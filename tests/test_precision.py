"""The torch backend's reduced-precision paths (what CUDA runs by default), run on the CPU against fp32.

float16 is the CUDA default and bfloat16 an option; both run here on the CPU so the dtype handling the
GPU path relies on (weights cast at load, inputs cast by ``asarray``, latents kept in the compute
dtype through the loop, outputs cast back to float32 for the host) has executed somewhere.

Tolerances, from measurements on the tiny model (4 steps, seed 1; measured -> bound):
- float16: final latents max |diff| / max |fp32 latents| 2.3e-3 -> 1e-2; image max diff 2 -> 8 (/255).
- bfloat16 (8 mantissa bits): 1.4e-2 -> 5e-2; image max diff 8 -> 24 (/255).
The background outside the region is bit-identical in every precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gradient_background, noise_object

from composekit import Compositor

TOLERANCE = {"float16": (1e-2, 8), "bfloat16": (5e-2, 24)}


@pytest.fixture(scope="module")
def fp32_result(tiny_model_dir):
    return _run(Compositor.from_pretrained(tiny_model_dir, device="cpu", dtype="float32"))


def _run(comp):
    latents = []
    bg = gradient_background(120, 90)
    r = comp.paste(noise_object(), bg, (20, 10, 100, 80), steps=4, seed=1, progress=False,
                   callback=lambda i, t, x: latents.append(x))
    return latents[-1], np.asarray(r.image, np.int16), r.mask, np.asarray(bg, np.int16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_matches_fp32_within_tolerance(tiny_model_dir, fp32_result, dtype):
    comp = Compositor.from_pretrained(tiny_model_dir, device="cpu", dtype=dtype)
    assert dtype in comp.backend.describe()
    assert all(p.dtype == getattr(torch, dtype) for p in comp.backend.unet_model.parameters())
    x = comp.backend.asarray(np.zeros((1, 4, 8, 8), np.float32))
    assert x.dtype == getattr(torch, dtype)  # inputs enter the loop in the compute dtype
    latents, image, mask, bg = _run(comp)
    ref_latents, ref_image, _, _ = fp32_result
    assert latents.dtype == np.float32  # back on the host as float32
    rel = np.abs(latents - ref_latents).max() / np.abs(ref_latents).max()
    rel_bound, pixel_bound = TOLERANCE[dtype]
    assert 0 < rel <= rel_bound, rel  # > 0: it really ran in another precision
    assert np.abs(image - ref_image).max() <= pixel_bound
    np.testing.assert_array_equal(image[~mask], bg[~mask])
