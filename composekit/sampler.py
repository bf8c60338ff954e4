"""The masked DDIM loop, written once against :class:`~composekit.backends.Backend`, in three stages.

:func:`encode` (object context, background latent, masks) -> :func:`denoise` (the loop) ->
:func:`decode` (latents -> pixels); :func:`sample` runs the three and times them. The loop talks to
the scheduler only through :class:`~composekit.scheduler.Scheduler` (timesteps and one update), so a
second scheduler needs no change here. The equations, as the docs' method pages state them:

- Paint by Example: the U-Net input is 9 channels, ``[x_t, E(I_bg * (1 - M)), 1 - M]`` (noisy
  latent, latent of the masked background, keep-mask), and classifier-free guidance uses the
  model's learned unconditional vector ``v``:
  ``eps = eps(x_t, v) + s * (eps(x_t, c) - eps(x_t, v))``.
- ObjectStitch's masked DDIM, for 4-channel U-Nets: after each step, the latent outside the mask is
  replaced by the background latent noised to the new timestep,
  ``x_{t-1} <- M * x_{t-1} + (1 - M) * q(z_bg, t-1)``.
- DDIM: ``x0_hat = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)``,
  ``x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma^2) eps + sigma z``.
- Fidelity control, masked ILVR (cross-domain compositing): with ``y_0`` the latent of the naive
  paste, after each of the first ``T`` steps
  ``x_{t-1} <- x_{t-1} + M_t * (phi(y_{t-1}) - phi(x_{t-1}))``, ``y_{t-1} ~ q(y_{t-1} | y_0)``, where
  ``phi`` downsamples by ``N`` and upsamples back (bilinear) and ``M_t`` is the region's latent mask
  blurred by ``N / 4`` cells inside the region (against aliasing at its edge).

All randomness (initial noise, DDIM's ``z`` for ``eta > 0``, the forward-noising of the background
and of ``y_0``) is drawn on the CPU with numpy from the seed, in a fixed order, so every backend and
device sees the same numbers. The fidelity draws come last, so ``fidelity=0`` draws exactly what the
sampler drew before fidelity existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .backends.base import Backend
from .errors import InputError, NumericalError
from .geometry import box_blur
from .scheduler import Scheduler

__all__ = ["SamplerOptions", "SampleOutput", "Encoded", "sample", "encode", "denoise", "decode",
           "lowpass_matrix", "ilvr_mask", "decode_cells"]

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
    ilvr: tuple[int, float] | None = None  # fidelity guidance: (low-pass factor N in cells, fraction of steps)


@dataclass(frozen=True)
class SampleOutput:
    image: np.ndarray  # (M, M, 3) uint8, the generated window
    latents: np.ndarray  # (1, 4, M/f, M/f) float32, the final latent
    timings: dict[str, float]
    guide_latents: np.ndarray | None = None  # (1, 4, M/f, M/f) float32: y_0, the naive paste's latent (fidelity)


@dataclass
class Encoded:
    """What the loop needs, in the backend's arrays (stage 1's output)."""

    cond: Any  # object context c (1, T, D)
    uncond: Any  # learned unconditional context v (1, T, D)
    z_bg: Any  # background latent: of the masked window (9 channels) or of the whole window (4 channels)
    keep: np.ndarray  # (1, 1, h, w) float32 on the host: 1 outside the hole, 0 inside
    keep_b: Any  # the same, on the backend
    guide: Any = None  # y_0: the naive paste's latent (fidelity control), or None


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise NumericalError(
            f"non-finite values (NaN/inf) in the {what}; with float16, retry with dtype='float32'"
        )


def _to_model_range(window: np.ndarray) -> np.ndarray:
    """``(M, M, 3)`` uint8 -> ``(1, 3, M, M)`` float32 in ``[-1, 1]``."""
    return window.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0


def encode(backend: Backend, window: np.ndarray, hole: np.ndarray, context: tuple[Any, Any],
           guide_window: np.ndarray | None = None) -> Encoded:
    """Stage 1: the background's latent and the masks (and ``y_0`` for fidelity), beside the object's
    ``context`` = (c, v) that ``backend.encode_object`` gave (1a: CLIP -> content adaptor / mapper)."""
    info = backend.info
    f = info.vae_scale_factor
    cond, uncond = context
    # 1b. Background: the window in [-1, 1]; keep-mask 1 - M at pixel and latent resolution.
    image = _to_model_range(window)
    keep = 1.0 - hole[None, None].astype(np.float32)
    keep_latent = np.ascontiguousarray(keep[:, :, ::f, ::f])  # hole is aligned to the latent grid: exact
    if info.unet_in_channels == 2 * info.latent_channels + 1:
        # E(I_bg * (1 - M)): the masked background's latent (posterior mean, scaled).
        z_bg = backend.encode_image(backend.asarray(image * keep))
    else:
        # E(I_bg): the whole window's latent, re-noised into the region outside the mask every step.
        z_bg = backend.encode_image(backend.asarray(image))
    # 1c. y_0 = E(naive paste), the fidelity guide.
    guide = backend.encode_image(backend.asarray(_to_model_range(guide_window))) if guide_window is not None else None
    return Encoded(cond, uncond, z_bg, keep_latent, backend.asarray(keep_latent), guide)


def lowpass_matrix(n: int, factor: int) -> np.ndarray:
    """``phi`` along one axis as an ``n x n`` matrix: the mean over blocks of ``factor`` cells, then
    linear interpolation back to ``n`` cells (half-pixel centres, edges clamped, as bilinear upsampling).

    ``phi(x) = P_h @ x @ P_w.T`` then needs only a matrix product, which every backend's arrays have.
    ``factor=1`` gives the identity.
    """
    blocks = np.array_split(np.arange(n), max(1, int(np.ceil(n / factor))))
    k = len(blocks)
    down = np.zeros((k, n), np.float64)
    for i, block in enumerate(blocks):
        down[i, block] = 1.0 / len(block)
    if k == n:
        return np.eye(n, dtype=np.float32)
    centres = np.array([b.mean() for b in blocks])  # block centres in cell coordinates
    up = np.zeros((n, k), np.float64)
    for j in range(n):
        pos = np.clip(j, centres[0], centres[-1])
        hi = int(np.searchsorted(centres, pos, side="left"))
        hi = min(max(hi, 1), k - 1) if k > 1 else 0
        if k == 1:
            up[j, 0] = 1.0
            continue
        lo = hi - 1
        w = (pos - centres[lo]) / (centres[hi] - centres[lo])
        up[j, lo], up[j, hi] = 1.0 - w, w
    return (up @ down).astype(np.float32)


def ilvr_mask(keep: np.ndarray, factor: int) -> np.ndarray:
    """``M_t``: the hole ``(1, 1, h, w)`` (1 inside), blurred by ``factor // 4`` cells inside the hole only."""
    hole = 1.0 - keep[0, 0]
    radius = factor // 4
    soft = box_blur(hole, radius) if radius > 0 else hole
    return (np.where(hole > 0.5, soft, 0.0)[None, None]).astype(np.float32)


def denoise(backend: Backend, scheduler: Scheduler, enc: Encoded, options: SamplerOptions,
            x_init: np.ndarray, rng: np.random.Generator) -> Any:
    """Stage 2: the masked DDIM loop from ``x_init``; returns the final latent (a backend array).

    No host synchronisation inside the loop unless a callback asks for the latents.
    """
    info = backend.info
    shape = x_init.shape
    nine_channel = info.unet_in_channels == 2 * info.latent_channels + 1
    x = backend.asarray(x_init)  # init_noise_sigma = 1 for DDIM

    # 2a. Guidance runs for the first ceil(guidance_end * steps) steps (all of them by default); after that
    #     one conditional pass per step (diffusers' "CFG cut-off"), halving the U-Net work there.
    guided_steps = int(np.ceil(options.guidance_end * options.steps)) if options.guidance > 1.0 else 0
    contexts = {1: enc.cond}
    if guided_steps:
        contexts[2] = backend.cat([enc.uncond, enc.cond], 0)
    if nine_channel:
        extras = {b: (backend.cat([enc.z_bg] * b, 0), backend.cat([enc.keep_b] * b, 0)) for b in contexts}
    timesteps = scheduler.timesteps(options.steps)
    # 2b. The loop's own noise (DDIM's z for eta > 0; ObjectStitch's background re-noising), drawn now in the
    #     loop's order and copied to the device once, so the loop makes no host->device copy.
    draws_per_step = int(options.eta > 0) + int(not nine_channel)
    step_noise = (backend.asarray(rng.standard_normal((len(timesteps), draws_per_step, *shape[1:]),
                                                      dtype=np.float32)) if draws_per_step else None)
    # 2c. Fidelity (masked ILVR): phi as two matrices, M_t, and the noise of y_{t-1}, drawn after the rest.
    ilvr_steps = 0
    if options.ilvr is not None and enc.guide is not None:
        factor, fraction = options.ilvr
        ilvr_steps = int(np.ceil(fraction * options.steps))
        p_h = backend.asarray(lowpass_matrix(shape[2], factor))
        p_w_t = backend.asarray(lowpass_matrix(shape[3], factor).T.copy())
        m_t = backend.asarray(ilvr_mask(enc.keep, factor))
        guide_noise = backend.asarray(rng.standard_normal((ilvr_steps, *shape[1:]), dtype=np.float32))
        phi = lambda a: p_h @ a @ p_w_t  # noqa: E731

    # 3. The loop.
    for i, t in enumerate(tqdm(timesteps, disable=not options.progress, desc="composekit", leave=False)):
        t = int(t)
        cfg = i < guided_steps
        batch = 2 if cfg else 1
        model_in = backend.cat([x, x], 0) if cfg else x
        if nine_channel:
            # 3a. U-Net input [x_t, E(I_bg * (1 - M)), 1 - M] (Paint by Example, 9 channels).
            model_in = backend.cat([model_in, *extras[batch]], 1)
        eps = backend.unet(model_in, t, contexts[batch])
        if cfg:
            # 3b. Classifier-free guidance: eps = eps(x, v) + s (eps(x, c) - eps(x, v)).
            eps = eps[:1] + options.guidance * (eps[1:] - eps[:1])
        # 3c. DDIM update x_t -> x_{t-1} (sigma from eta; z drawn on the CPU).
        z = step_noise[i, :1] if options.eta > 0 else None
        x, _ = scheduler.step(eps, t, x, options.steps, eta=options.eta, noise=z)
        t_prev = scheduler.previous_timestep(t, options.steps)
        if i < ilvr_steps:
            # 3d. Masked ILVR: x_{t-1} += M_t (phi(y_{t-1}) - phi(x_{t-1})), y_{t-1} ~ q(y_{t-1} | y_0).
            y_prev = scheduler.add_noise(enc.guide, guide_noise[i:i + 1], t_prev) if t_prev >= 0 else enc.guide
            x = x + m_t * (phi(y_prev) - phi(x))
        if not nine_channel:
            # 3e. ObjectStitch's masked step: outside M, the background latent noised to t-1.
            noise = step_noise[i, draws_per_step - 1:draws_per_step]
            z_bg_t = scheduler.add_noise(enc.z_bg, noise, t_prev) if t_prev >= 0 else enc.z_bg
            x = x * (1.0 - enc.keep_b) + z_bg_t * enc.keep_b
        if options.callback is not None:
            options.callback(i, t, backend.to_numpy(x))
    return x


def decode(backend: Backend, x: Any, keep: np.ndarray, window: np.ndarray, mode: str) -> np.ndarray:
    """Stage 3: decode the window (or, with ``mode="region"``, only the hole's latent cells plus a margin:
    the rest of the window is never pasted back) and map ``[-1, 1]`` -> uint8 over a copy of ``window``."""
    f = backend.info.vae_scale_factor
    ya, yb, xa, xb = decode_cells(keep[0, 0], mode)
    decoded = backend.to_numpy(backend.decode(x[:, :, ya:yb, xa:xb]))[0]
    _check_finite(decoded, "decoded image")
    pixels = np.rint(np.clip(decoded / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    out = window.copy()
    out[ya * f:yb * f, xa * f:xb * f] = pixels
    return np.ascontiguousarray(out)


def sample(
    backend: Backend,
    scheduler: Scheduler,
    window: np.ndarray,
    hole: np.ndarray,
    object_pixels: np.ndarray,
    options: SamplerOptions,
    latents: np.ndarray | None = None,
    encode_object: Callable[[np.ndarray], tuple[Any, Any]] | None = None,
    guide_window: np.ndarray | None = None,
) -> SampleOutput:
    """Generate the window ``(M, M, 3)`` uint8 with the ``hole`` ``(M, M)`` (1 = regenerate) filled in.

    ``encode_object`` replaces ``backend.encode_object`` (the compositor passes a cached version, so
    an object seen in a recent call is not encoded again). ``guide_window`` is the naive paste over the
    window (``(M, M, 3)`` uint8), needed when ``options.ilvr`` is set.
    """
    info = backend.info
    f, m = info.vae_scale_factor, info.model_size
    shape = (1, info.latent_channels, m // f, m // f)
    rng = np.random.default_rng(options.seed)
    if options.ilvr is not None and guide_window is None:
        raise InputError("fidelity control needs the naive paste (guide_window)")
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        backend.synchronize()
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - start
        return now

    t0 = time.perf_counter()
    # Stage 1, timed in two laps: the object, then the images.
    context = (encode_object or backend.encode_object)(object_pixels)
    t0 = lap("encode_object", t0)
    enc = encode(backend, window, hole, context, guide_window=guide_window if options.ilvr is not None else None)
    t0 = lap("encode_image", t0)

    # x_T: the caller's latents, or N(0, I) drawn on the CPU from the seed (numpy PCG64).
    if latents is None:
        x_init = rng.standard_normal(shape, dtype=np.float32)
    else:
        x_init = _caller_latents(latents, shape)
    x = denoise(backend, scheduler, enc, options, x_init, rng)
    t0 = lap("denoise", t0)

    final = backend.to_numpy(x)
    _check_finite(final, "final latents")
    image = decode(backend, x, enc.keep, window, options.decode)
    lap("decode", t0)
    guide = backend.to_numpy(enc.guide) if enc.guide is not None else None
    return SampleOutput(image=image, latents=final, timings=timings, guide_latents=guide)


def _caller_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The caller's initial noise as float32, checked: an array of ``shape`` with finite values."""
    if not isinstance(latents, np.ndarray) and not hasattr(latents, "__array__"):
        raise InputError(f"latents must be a numpy array of shape {shape}, got {type(latents).__name__}")
    try:
        x = np.asarray(latents, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"latents must be a float array of shape {shape}: {exc}") from None
    if x.shape != shape:
        raise InputError(f"latents have shape {x.shape}; expected {shape} for this model")
    if not np.isfinite(x).all():
        raise InputError("latents hold NaN or inf values; expected finite noise, e.g. np.random.randn")
    return x


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
