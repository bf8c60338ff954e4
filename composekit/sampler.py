"""The masked DDIM loop, written once against :class:`~composekit.backends.Backend`.

Equation references are to ``docs/method.md`` (from the project's shared method note):

- Paint by Example: the U-Net input is 9 channels, ``[x_t, E(I_bg * (1 - M)), 1 - M]`` (noisy
  latent, latent of the masked background, keep-mask), and classifier-free guidance uses the
  model's learned unconditional vector ``v``:
  ``eps = eps(x_t, v) + s * (eps(x_t, c) - eps(x_t, v))``.
- ObjectStitch's masked DDIM, for 4-channel U-Nets: after each step, the latent outside the mask is
  replaced by the background latent noised to the new timestep,
  ``x_{t-1} <- M * x_{t-1} + (1 - M) * q(z_bg, t-1)``.
- DDIM: ``x0_hat = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)``,
  ``x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma^2) eps + sigma z``.

All randomness (initial noise, DDIM's ``z`` for ``eta > 0``, the forward-noising of the background)
is drawn on the CPU with numpy from the seed, so every backend and device sees the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .backends.base import Backend
from .errors import InputError, NumericalError
from .scheduler import DDIMScheduler

__all__ = ["SamplerOptions", "SampleOutput", "sample"]

StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 50
    guidance: float = 5.0
    eta: float = 0.0
    seed: int = 0
    guidance_end: float = 1.0  # fraction of the steps that use guidance (the rest run one conditional pass)
    decode: str = "window"  # "window": decode the whole window; "region": only the hole plus a margin
    progress: bool = True
    callback: StepCallback | None = None


@dataclass(frozen=True)
class SampleOutput:
    image: np.ndarray  # (M, M, 3) uint8, the generated window
    latents: np.ndarray  # (1, 4, M/f, M/f) float32, the final latent
    timings: dict[str, float]


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise NumericalError(
            f"non-finite values (NaN/inf) in the {what}; with float16, retry with dtype='float32'"
        )


def sample(
    backend: Backend,
    scheduler: DDIMScheduler,
    window: np.ndarray,
    hole: np.ndarray,
    object_pixels: np.ndarray,
    options: SamplerOptions,
    latents: np.ndarray | None = None,
    encode_object: Callable[[np.ndarray], tuple[Any, Any]] | None = None,
) -> SampleOutput:
    """Generate the window ``(M, M, 3)`` uint8 with the ``hole`` ``(M, M)`` (1 = regenerate) filled in.

    ``encode_object`` replaces ``backend.encode_object`` (the compositor passes a cached version, so
    an object seen in a recent call is not encoded again).
    """
    info = backend.info
    f, m = info.vae_scale_factor, info.model_size
    shape = (1, info.latent_channels, m // f, m // f)
    rng = np.random.default_rng(options.seed)
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        backend.synchronize()
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - start
        return now

    t0 = time.perf_counter()
    # 1. Object -> context tokens c, and the learned unconditional context v (Paint by Example's CFG).
    cond, uncond = (encode_object or backend.encode_object)(object_pixels)
    t0 = lap("encode_object", t0)

    # 2. Background: the window in [-1, 1]; keep-mask 1 - M at pixel and latent resolution.
    image = window.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    keep = 1.0 - hole[None, None].astype(np.float32)
    keep_latent = keep[:, :, ::f, ::f]  # hole is aligned to the latent grid: nearest == exact
    nine_channel = info.unet_in_channels == 2 * info.latent_channels + 1
    if nine_channel:
        # E(I_bg * (1 - M)): the masked background's latent (posterior mean, scaled).
        z_bg = backend.encode_image(backend.asarray(image * keep))
    else:
        # E(I_bg): the whole window's latent, re-noised into the region outside the mask every step.
        z_bg = backend.encode_image(backend.asarray(image))
    keep_latent_b = backend.asarray(keep_latent)
    t0 = lap("encode_image", t0)

    # 3. x_T: the caller's latents, or N(0, I) drawn on the CPU from the seed (numpy PCG64).
    if latents is None:
        x_init = rng.standard_normal(shape, dtype=np.float32)
    else:
        x_init = np.asarray(latents, dtype=np.float32)
        if x_init.shape != shape:
            raise InputError(f"latents have shape {x_init.shape}; expected {shape} for this model")
    x = backend.asarray(x_init)  # init_noise_sigma = 1 for DDIM

    # Guidance runs for the first ceil(guidance_end * steps) steps (all of them by default); after that
    # one conditional pass per step (diffusers' "CFG cut-off"), halving the U-Net work there.
    guided_steps = int(np.ceil(options.guidance_end * options.steps)) if options.guidance > 1.0 else 0
    contexts = {1: cond}
    if guided_steps:
        contexts[2] = backend.cat([uncond, cond], 0)
    if nine_channel:
        extras = {b: (backend.cat([z_bg] * b, 0), backend.cat([keep_latent_b] * b, 0)) for b in contexts}
    timesteps = scheduler.timesteps(options.steps)
    # The loop's own noise (DDIM's z for eta > 0; ObjectStitch's background re-noising), drawn now in the
    # loop's order and copied to the device once, so the loop makes no host->device copy (a host sync on CUDA).
    draws_per_step = int(options.eta > 0) + int(not nine_channel)
    step_noise = (backend.asarray(rng.standard_normal((len(timesteps), draws_per_step, *shape[1:]), dtype=np.float32))
                  if draws_per_step else None)

    # 4. The masked DDIM loop (no host synchronisation inside it unless a callback asks for the latents).
    for i, t in enumerate(tqdm(timesteps, disable=not options.progress, desc="composekit", leave=False)):
        t = int(t)
        cfg = i < guided_steps
        batch = 2 if cfg else 1
        model_in = backend.cat([x, x], 0) if cfg else x
        if nine_channel:
            # 4a. U-Net input [x_t, E(I_bg * (1 - M)), 1 - M] (Paint by Example, 9 channels).
            model_in = backend.cat([model_in, *extras[batch]], 1)
        eps = backend.unet(model_in, t, contexts[batch])
        if cfg:
            # 4b. Classifier-free guidance: eps = eps(x, v) + s (eps(x, c) - eps(x, v)).
            eps = eps[:1] + options.guidance * (eps[1:] - eps[:1])
        # 4c. DDIM update x_t -> x_{t-1} (sigma from eta; z drawn on the CPU).
        z = step_noise[i, :1] if options.eta > 0 else None
        x, _ = scheduler.step(eps, t, x, options.steps, eta=options.eta, noise=z)
        if not nine_channel:
            # 4d. ObjectStitch's masked step: outside M, the background latent noised to t-1.
            t_prev = scheduler.coefficients(t, options.steps).t_prev
            noise = step_noise[i, draws_per_step - 1:draws_per_step]
            z_bg_t = scheduler.add_noise(z_bg, noise, t_prev) if t_prev >= 0 else z_bg
            x = x * (1.0 - keep_latent_b) + z_bg_t * keep_latent_b
        if options.callback is not None:
            options.callback(i, t, backend.to_numpy(x))
    t0 = lap("denoise", t0)

    # 5. Decode the window (or, with decode="region", only the hole's latent cells plus a margin: the
    #    rest of the window is never pasted back) and map [-1, 1] -> uint8.
    final = backend.to_numpy(x)
    _check_finite(final, "final latents")
    ya, yb, xa, xb = decode_cells(keep_latent[0, 0], options.decode)
    decoded = backend.to_numpy(backend.decode(x[:, :, ya:yb, xa:xb]))[0]
    _check_finite(decoded, "decoded image")
    pixels = np.rint(np.clip(decoded / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    out = window.copy()
    out[ya * f:yb * f, xa * f:xb * f] = pixels
    lap("decode", t0)
    return SampleOutput(image=np.ascontiguousarray(out), latents=final, timings=timings)


# Latent cells decoded around the hole with decode="region" (64 pixels for SD's factor 8). The VAE
# decoder's convolutions see past a crop's edge; this margin keeps the pixels that are pasted back
# away from it.
REGION_MARGIN = 8


def decode_cells(keep: np.ndarray, mode: str) -> tuple[int, int, int, int]:
    """Latent rows and columns ``(y0, y1, x0, x1)`` to decode: all of them, or the hole plus a margin."""
    h, w = keep.shape
    if mode == "window" or keep.all():
        return 0, h, 0, w
    rows, cols = np.nonzero(keep < 0.5)
    return (max(int(rows.min()) - REGION_MARGIN, 0), min(int(rows.max()) + 1 + REGION_MARGIN, h),
            max(int(cols.min()) - REGION_MARGIN, 0), min(int(cols.max()) + 1 + REGION_MARGIN, w))
