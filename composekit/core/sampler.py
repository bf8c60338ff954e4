"""The masked DDIM loop, written once against :class:`~composekit.backends.Backend`, in three stages.

:func:`encode` (object context, background latent, masks) -> :func:`denoise` (the loop) ->
:func:`decode` (latents -> pixels); :func:`sample_batch` runs the three for a batch of jobs and times them. The loop talks to
the scheduler only through :class:`~composekit.core.scheduler.Scheduler` (timesteps and one update), so a
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
- Feature caching (DeepCache-style): the U-Net's output depends on its deep features ``h`` (everything
  before its last up layer) and on a shallow branch (``conv_in`` -> last up layer -> ``conv_out``).
  ``h`` changes slowly across steps, so with ``cache_interval = N`` step ``i`` runs
  ``eps, h_cache = U(x_t)`` when ``i mod N = 0`` and ``eps = U_shallow(x_t, h_cache)`` otherwise.
- Fidelity control, masked ILVR (cross-domain compositing): with ``y_0`` the latent of the naive
  paste, after each of the first ``T`` steps
  ``x_{t-1} <- x_{t-1} + M_t * (phi(y_{t-1}) - phi(x_{t-1}))``, ``y_{t-1} ~ q(y_{t-1} | y_0)``, where
  ``phi`` downsamples by ``N`` and upsamples back (bilinear) and ``M_t`` is the region's latent mask
  blurred by ``N / 4`` cells inside the region (against aliasing at its edge).

All randomness (initial noise, DDIM's ``z`` for ``eta > 0``, the forward-noising of the background
and of ``y_0``) is drawn on the CPU with numpy from the seed, in a fixed order, so every backend and
device sees the same numbers. The fidelity draws come last, so ``fidelity=0`` draws exactly what the
sampler drew before fidelity existed.

Batches: :func:`sample_batch` runs ``B`` independent composites together — one U-Net call per step
for all of them (``2B`` rows with guidance), one VAE encode and one decode. Each job has its own
window, hole, object, seed and random generator, drawn in the same order as alone, so a job's result
equals its one-by-one result up to the runtime's batch-size-dependent rounding (tested: latents
within 1e-5 in fp32). A job whose latents turn non-finite fails alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from composekit.backends.base import Backend
from composekit.core.geometry import box_blur
from composekit.core.options import PasteOptions
from composekit.core.scheduler import Scheduler
from composekit.errors import InputError, NumericalError

__all__ = ["SampleOutput", "Encoded", "Job", "sample_batch", "encode", "denoise",
           "decode", "lowpass_matrix", "ilvr_mask", "decode_cells", "check_latents"]

StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class Job:
    """One composite's sampler inputs: the window ``(M, M, 3)`` uint8, its hole ``(M, M)`` (1 = regenerate),
    the object's CLIP pixels ``(1, 3, C, C)``, its seed, and the naive paste over the window (fidelity)."""

    window: np.ndarray
    hole: np.ndarray
    object_pixels: np.ndarray
    seed: int
    guide_window: np.ndarray | None = None
    latents: np.ndarray | None = None  # the caller's x_T (1, 4, h, w), checked


@dataclass(frozen=True)
class SampleOutput:
    image: np.ndarray  # (M, M, 3) uint8, the generated window
    latents: np.ndarray  # (1, 4, M/f, M/f) float32, the final latent
    timings: dict[str, float]  # the batch's stage times
    guide_latents: np.ndarray | None = None  # (1, 4, M/f, M/f) float32: y_0, the naive paste's latent (fidelity)


@dataclass
class Encoded:
    """What the loop needs, in the backend's arrays (stage 1's output), for a batch of ``B`` jobs."""

    cond: Any  # object contexts c (B, T, D)
    uncond: Any  # learned unconditional contexts v (B, T, D)
    z_bg: Any  # background latents: of the masked window (9 channels) or of the whole window (4 channels)
    keep: np.ndarray  # (B, 1, h, w) float32 on the host: 1 outside the hole, 0 inside
    keep_b: Any  # the same, on the backend
    guide: Any = None  # y_0: the naive pastes' latents (fidelity control), or None


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Per job (first axis): are all values finite?"""
    return np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)


def _nonfinite(what: str) -> NumericalError:
    return NumericalError(f"non-finite values (NaN/inf) in the {what}; with float16 or bfloat16, retry with "
                          "dtype='float32'; in float32, the model's weights may hold NaN or inf")


def _to_model_range(windows: list[np.ndarray]) -> np.ndarray:
    """``B x (M, M, 3)`` uint8 -> ``(B, 3, M, M)`` float32 in ``[-1, 1]``."""
    return np.stack([w.astype(np.float32).transpose(2, 0, 1) for w in windows]) / 127.5 - 1.0


def encode(backend: Backend, windows: list[np.ndarray], holes: list[np.ndarray], context: tuple[Any, Any],
           guide_windows: list[np.ndarray] | None = None) -> Encoded:
    """Stage 1: the backgrounds' latents and the masks (and ``y_0`` for fidelity), beside the objects'
    ``context`` = (c, v) that ``backend.encode_object`` gave (1a: CLIP -> content adaptor / mapper)."""
    info = backend.info
    f = info.vae_scale_factor
    cond, uncond = context
    # 1b. Backgrounds: the windows in [-1, 1]; keep-masks 1 - M at pixel and latent resolution.
    image = _to_model_range(windows)
    keep = 1.0 - np.stack([h[None].astype(np.float32) for h in holes])
    keep_latent = np.ascontiguousarray(keep[:, :, ::f, ::f])  # holes are aligned to the latent grid: exact
    if info.unet_in_channels == 2 * info.latent_channels + 1:
        # E(I_bg * (1 - M)): the masked backgrounds' latents (posterior mean, scaled).
        z_bg = backend.encode_image(backend.asarray(image * keep))
    else:
        # E(I_bg): the whole windows' latents, re-noised into the region outside the mask every step.
        z_bg = backend.encode_image(backend.asarray(image))
    # 1c. y_0 = E(naive paste), the fidelity guide.
    guide = backend.encode_image(backend.asarray(_to_model_range(guide_windows))) if guide_windows else None
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
    """``M_t``: the holes ``(B, 1, h, w)`` (1 inside), blurred by ``factor // 4`` cells inside each hole only."""
    radius = factor // 4
    masks = []
    for k in keep[:, 0]:
        hole = 1.0 - k
        soft = box_blur(hole, radius) if radius > 0 else hole
        masks.append(np.where(hole > 0.5, soft, 0.0)[None])
    return np.stack(masks).astype(np.float32)


def _noise(rngs: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One draw of ``shape`` from each job's generator, stacked on a new batch axis at position -4."""
    draws = [rng.standard_normal(shape, dtype=np.float32) for rng in rngs]
    return np.stack(draws, axis=-4)


def denoise(backend: Backend, scheduler: Scheduler, enc: Encoded, options: PasteOptions,
            x_init: np.ndarray, rngs: list[np.random.Generator], callback: StepCallback | None = None) -> Any:
    """Stage 2: the masked DDIM loop from ``x_init`` ``(B, 4, h, w)``; returns the final latents (a backend
    array). ``rngs`` are the jobs' generators, already past their x_T draw; ``callback(step, t, latents)``
    sees the latents after every step.

    No host synchronisation inside the loop unless a callback asks for the latents.
    """
    info = backend.info
    b = x_init.shape[0]
    latent = x_init.shape[1:]
    nine_channel = info.unet_in_channels == 2 * info.latent_channels + 1
    x = backend.asarray(x_init)  # init_noise_sigma = 1 for DDIM

    # 2a. Guidance runs for the first ceil(guidance_end * steps) steps (all of them by default); after that
    #     one conditional pass per step (diffusers' "CFG cut-off"), halving the U-Net work there.
    guided_steps = int(np.ceil(options.guidance_end * options.steps)) if options.guidance > 1.0 else 0
    contexts = {1: enc.cond}
    if guided_steps:
        contexts[2] = backend.cat([enc.uncond, enc.cond], 0)  # rows [v_1..v_B, c_1..c_B]
    if nine_channel:
        extras = {k: (backend.cat([enc.z_bg] * k, 0), backend.cat([enc.keep_b] * k, 0)) for k in contexts}
    timesteps = scheduler.timesteps(options.steps)
    # 2b. The loop's own noise (DDIM's z for eta > 0; ObjectStitch's background re-noising), drawn now from
    #     each job's generator in the loop's order and copied to the device once: no host->device copy later.
    draws_per_step = int(options.eta > 0) + int(not nine_channel)
    step_noise = (backend.asarray(_noise(rngs, (len(timesteps), draws_per_step, *latent)))
                  if draws_per_step else None)  # (steps, draws, B, 4, h, w)
    # 2c. Fidelity (masked ILVR): phi as two matrices, M_t, and the noise of y_{t-1}, drawn after the rest.
    ilvr_steps = 0
    if options.ilvr is not None and enc.guide is not None:
        factor, fraction = options.ilvr
        ilvr_steps = int(np.ceil(fraction * options.steps))
        p_h = backend.asarray(lowpass_matrix(latent[1], factor))
        p_w_t = backend.asarray(lowpass_matrix(latent[2], factor).T.copy())
        m_t = backend.asarray(ilvr_mask(enc.keep, factor))
        guide_noise = backend.asarray(_noise(rngs, (ilvr_steps, *latent)))  # (steps, B, 4, h, w)
        phi = lambda a: p_h @ a @ p_w_t  # noqa: E731

    interval = options.cache_interval
    features = None  # h_cache: the deep features of the last full pass (feature caching)

    # 3. The loop.
    for i, t in enumerate(tqdm(timesteps, disable=not options.progress, desc="composekit", leave=False)):
        t = int(t)
        cfg = i < guided_steps
        k = 2 if cfg else 1
        model_in = backend.cat([x, x], 0) if cfg else x
        if nine_channel:
            # 3a. U-Net input [x_t, E(I_bg * (1 - M)), 1 - M] (Paint by Example, 9 channels).
            model_in = backend.cat([model_in, *extras[k]], 1)
        if interval == 1:
            eps = backend.unet(model_in, t, contexts[k])
        elif i % interval == 0:
            # 3a'. Feature caching, full step: eps and h_cache = the deep features of this pass.
            eps, features = backend.unet_with_features(model_in, t, contexts[k])
        else:
            # 3a''. Feature caching, shallow step: eps from x_t and h_cache. Guidance ended since the full
            #       pass: keep h_cache's conditional rows (its rows are [v_1..v_B, c_1..c_B]).
            if features.shape[0] != model_in.shape[0]:
                features = features[b:]
            eps = backend.unet_shallow(model_in, t, contexts[k], features)
        if cfg:
            # 3b. Classifier-free guidance: eps = eps(x, v) + s (eps(x, c) - eps(x, v)).
            eps = eps[:b] + options.guidance * (eps[b:] - eps[:b])
        # 3c. DDIM update x_t -> x_{t-1} (sigma from eta; z drawn on the CPU).
        z = step_noise[i, 0] if options.eta > 0 else None
        x, _ = scheduler.step(eps, t, x, options.steps, eta=options.eta, noise=z)
        t_prev = scheduler.previous_timestep(t, options.steps)
        if i < ilvr_steps:
            # 3d. Masked ILVR: x_{t-1} += M_t (phi(y_{t-1}) - phi(x_{t-1})), y_{t-1} ~ q(y_{t-1} | y_0).
            y_prev = scheduler.add_noise(enc.guide, guide_noise[i], t_prev) if t_prev >= 0 else enc.guide
            x = x + m_t * (phi(y_prev) - phi(x))
        if not nine_channel:
            # 3e. ObjectStitch's masked step: outside M, the background latent noised to t-1.
            z_bg_t = scheduler.add_noise(enc.z_bg, step_noise[i, draws_per_step - 1], t_prev) if t_prev >= 0 \
                else enc.z_bg
            x = x * (1.0 - enc.keep_b) + z_bg_t * enc.keep_b
        if callback is not None:
            callback(i, t, backend.to_numpy(x))
    return x


def decode(backend: Backend, x: Any, keep: np.ndarray, windows: list[np.ndarray], mode: str,
           rows: list[int], tiny: bool = False) -> dict[int, np.ndarray]:
    """Stage 3: decode the jobs in ``rows`` (their whole windows in one call, or with ``mode="region"`` each
    job's hole cells plus a margin: the rest of a window is never pasted back) and map ``[-1, 1]`` -> uint8
    over a copy of each window. Returns row -> image; a row whose decoded pixels are not finite is left out.
    ``tiny``: with the backend's tiny decoder when it holds one (``speed="fast"``)."""
    f = backend.info.vae_scale_factor
    cells = {r: decode_cells(keep[r, 0], mode) for r in rows}
    out: dict[int, np.ndarray] = {}
    if mode == "window" or all(c == (0, keep.shape[2], 0, keep.shape[3]) for c in cells.values()):
        picked = x if len(rows) == x.shape[0] else backend.cat([x[r:r + 1] for r in rows], 0)
        decoded = backend.to_numpy(backend.decode(picked, tiny=tiny))
        parts = {r: decoded[j] for j, r in enumerate(rows)}
    else:
        parts = {}
        for r in rows:
            ya, yb, xa, xb = cells[r]
            parts[r] = backend.to_numpy(backend.decode(x[r:r + 1, :, ya:yb, xa:xb], tiny=tiny))[0]
    for r, decoded in parts.items():
        if not np.isfinite(decoded).all():
            continue
        ya, yb, xa, xb = cells[r]
        pixels = np.rint(np.clip(decoded / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
        image = windows[r].copy()
        image[ya * f:yb * f, xa * f:xb * f] = pixels
        out[r] = np.ascontiguousarray(image)
    return out


def sample_batch(backend: Backend, scheduler: Scheduler, jobs: list[Job], options: PasteOptions,
                 callback: StepCallback | None = None) -> list[SampleOutput | NumericalError]:
    """Generate every job's window together; returns, per job, its output or the NumericalError it hit.

    The objects' contexts come from one ``backend.encode_object`` call on the stacked pixels (the
    compositor's backend is wrapped in a context cache, so an object seen in a recent call is not encoded
    again). Jobs need a ``guide_window`` when ``options.ilvr`` is set; when every job has one, ``y_0`` is
    encoded (and returned) even with fidelity off.
    """
    if options.ilvr is not None and any(j.guide_window is None for j in jobs):
        raise InputError("fidelity control needs the naive paste (guide_window) of every job")
    rngs = [np.random.default_rng(j.seed) for j in jobs]
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        backend.synchronize()
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - start
        return now

    t0 = time.perf_counter()
    # Stage 1, timed in two laps: the objects (1a), then the images (1b, 1c).
    context = backend.encode_object(np.concatenate([j.object_pixels for j in jobs]))
    t0 = lap("encode_object", t0)
    guides = [j.guide_window for j in jobs]
    enc = encode(backend, [j.window for j in jobs], [j.hole for j in jobs], context,
                 guide_windows=guides if all(g is not None for g in guides) else None)
    t0 = lap("encode_image", t0)

    # x_T: each job's own latents, or N(0, I) drawn on the CPU from its seed (numpy PCG64).
    shape = backend.info.latent_shape()
    x_init = np.concatenate([rng.standard_normal(shape, dtype=np.float32) if j.latents is None else j.latents
                             for j, rng in zip(jobs, rngs)])
    x = denoise(backend, scheduler, enc, options, x_init, rngs, callback)
    t0 = lap("denoise", t0)

    final = backend.to_numpy(x)
    finite = _finite_rows(final)
    rows = [r for r in range(len(jobs)) if finite[r]]
    images = decode(backend, x, enc.keep, [j.window for j in jobs], options.decode, rows,
                    tiny=options.speed == "fast") if rows else {}
    lap("decode", t0)
    guide = backend.to_numpy(enc.guide) if enc.guide is not None else None
    results: list[SampleOutput | NumericalError] = []
    for r in range(len(jobs)):
        if not finite[r]:
            results.append(_nonfinite("final latents"))
        elif r not in images:
            results.append(_nonfinite("decoded image"))
        else:
            results.append(SampleOutput(image=images[r], latents=final[r:r + 1], timings=dict(timings),
                                        guide_latents=guide[r:r + 1] if guide is not None else None))
    return results


def check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
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
