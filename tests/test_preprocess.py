"""Object preprocessing: cut-outs and the feature extractor's config."""

from __future__ import annotations

import numpy as np
import pytest

from composekit.core.preprocess import ClipPreprocessor, flatten_cutout
from composekit.errors import InputError, ModelError


def test_cutout_is_tightened_whitened_and_squared():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[...] = (10, 20, 30)
    alpha = np.zeros((40, 60), np.uint8)
    alpha[5:15, 10:50] = 255  # a 40x10 opaque strip
    alpha[5, 10] = 128  # one half-transparent pixel
    before = rgb.copy(), alpha.copy()
    out = flatten_cutout(rgb, alpha)
    assert out.shape == (40, 40, 3)
    assert (out[:15] == 255).all() and (out[25:] == 255).all()  # white padding above and below
    assert (out[16:25, 1:] == (10, 20, 30)).all()
    assert tuple(out[15, 0]) == tuple(np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255).astype(int))
    np.testing.assert_array_equal(rgb, before[0])
    np.testing.assert_array_equal(alpha, before[1])


def test_opaque_object_passes_through():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    assert flatten_cutout(rgb, None) is rgb


def test_transparent_object_is_refused():
    with pytest.raises(InputError, match="transparent"):
        flatten_cutout(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5), np.uint8))


def test_config_variants():
    p = ClipPreprocessor.from_config({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}})
    assert (p.size, p.crop) == (256, 224)
    assert ClipPreprocessor.from_config({"size": 224, "crop_size": 224}).crop == 224
    assert p(np.zeros((50, 80, 3), np.uint8)).shape == (1, 3, 224, 224)
    with pytest.raises(ModelError):
        ClipPreprocessor.from_config({"size": {"height": 200, "width": 300}})
    with pytest.raises(ModelError):
        ClipPreprocessor.from_config({"do_center_crop": False})
