"""Full-size random model (SD 1.x dimensions): builds, loads and composites one step on the CPU.

Slow (about a minute to build ~5 GB of weights and a minute to run on 2 cores): marked ``slow`` and
kept out of CI. Run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gradient_background, noise_object

pytestmark = pytest.mark.slow


def test_full_size_model_runs_one_step(tmp_path_factory):
    from composekit import Compositor
    from composekit.apps.random_models import make_random_model

    d = make_random_model(tmp_path_factory.mktemp("full") / "full", "full", seed=0)
    comp = Compositor.from_pretrained(d, device="cpu")
    info = comp.backend.info
    assert (info.model_size, info.vae_scale_factor, info.unet_in_channels) == (512, 8, 9)
    n_unet = sum(p.numel() for p in comp.backend.unet_model.parameters())
    assert 855e6 < n_unet < 865e6  # SD 1.x U-Net with 9 input channels: ~860M
    n_clip = sum(p.numel() for p in comp.backend.image_encoder.model.parameters())
    assert 300e6 < n_clip < 310e6  # CLIP ViT-L/14 vision tower: ~303M
    bg = gradient_background(800, 600)
    shapes = []
    r = comp.paste(noise_object(), bg, (300, 200, 560, 460), steps=1, seed=0, progress=False,
                   callback=lambda i, t, x: shapes.append(x.shape))
    assert shapes == [(1, 4, 64, 64)]
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])
