"""composekit's numpy DDIM against diffusers' DDIMScheduler (the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from composekit.core.scheduler import DDIMScheduler
from composekit.errors import ModelError

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)
OTHER_CONFIGS = [
    dict(),  # diffusers' defaults: linear betas, clip_sample=True, set_alpha_to_one=True
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False),
    dict(SD_CONFIG, timestep_spacing="linspace", prediction_type="v_prediction"),
    dict(SD_CONFIG, timestep_spacing="trailing", prediction_type="sample"),
]


def _trajectory(ours: DDIMScheduler, ref, steps: int, eta: float, seed: int = 0, relative: bool = False) -> float:
    """Max |ours - ref| of prev_sample over a realistic trajectory (divided by 1 + max|ref| if relative).

    The "model" is an oracle denoiser for a fixed clean latent x0 (plus noise), so magnitudes stay
    O(1) as in real sampling; both schedulers step from the reference's sample each time.
    """
    ref.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = rng.standard_normal(x0.shape).astype(np.float32)
    worst = 0.0
    for t in ours.timesteps(steps):
        a = ours.alpha(int(t))
        eps = ((x - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)
        eps += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
        z = rng.standard_normal(x.shape).astype(np.float32)
        expected = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(x), eta=eta,
                            variance_noise=torch.from_numpy(z)).prev_sample.numpy()
        got, _ = ours.step(eps, int(t), x, steps, eta=eta, noise=z)
        got_torch, _ = ours.step(torch.from_numpy(eps), int(t), torch.from_numpy(x), steps, eta=eta,
                                 noise=torch.from_numpy(z))
        scale = 1.0 + float(np.abs(expected).max()) if relative else 1.0
        err = max(float(np.abs(got - expected).max()), float(np.abs(got_torch.numpy() - expected).max()))
        worst = max(worst, err / scale)
        x = expected
    return worst


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sd_schedule_matches_diffusers(steps, eta):
    ref = diffusers.DDIMScheduler(**SD_CONFIG)
    ours = DDIMScheduler.from_config(dict(ref.config))
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert _trajectory(ours, ref, steps, eta) <= 1e-6


@pytest.mark.parametrize("config", OTHER_CONFIGS)
@pytest.mark.parametrize("steps", [10, 50])
def test_other_configs_match_diffusers(config, steps):
    ref = diffusers.DDIMScheduler(**config)
    ours = DDIMScheduler.from_config(dict(ref.config))
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy())
    # Schedules whose a_t reaches ~0 (cosine + trailing starts at t=999) amplify float32 rounding by
    # 1/sqrt(a_t), so these are compared relative to the sample's magnitude.
    assert _trajectory(ours, ref, steps, eta=0.0, relative=True) <= 2e-6


def test_missing_clip_sample_means_no_clipping():
    # A PNDM config (as shipped with SD/Paint-by-Example) has no clip_sample key: latents are not clipped.
    ours = DDIMScheduler.from_config({k: v for k, v in SD_CONFIG.items() if k != "clip_sample"})
    assert ours.clip_sample is False


@pytest.mark.parametrize(
    "config",
    [dict(beta_schedule="cubic"), dict(timestep_spacing="random"), dict(prediction_type="flow"),
     dict(thresholding=True), dict(trained_betas=[0.1] * 1000), dict(num_train_timesteps="many")],
)
def test_unsupported_config_is_a_model_error(config):
    with pytest.raises(ModelError):
        DDIMScheduler.from_config(config)


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_bad_step_count(steps):
    with pytest.raises(ValueError):
        DDIMScheduler().timesteps(steps)


def test_eta_needs_noise():
    s = DDIMScheduler()
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError):
        s.step(x, int(s.timesteps(10)[0]), x, 10, eta=0.5)
