"""DDIM noise schedule and update rule, in numpy, with no model imports.

The schedule is read from a diffusers ``scheduler_config.json`` (any of the SD-family schedulers:
the beta parameters are shared). The arithmetic of :meth:`DDIMScheduler.step` uses only ``+ - *
/`` and ``.clip``, so it runs unchanged on numpy arrays and on framework tensors (torch, CuPy):
the sampler keeps latents on the device while the scalars come from here.

Equations (DDIM, Song et al. 2021, as the docs' concepts page states them), with ``a_t = alphas_cumprod[t]``::

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_{t-1} = sqrt(a_{t-1}) * x0_hat + sqrt(1 - a_{t-1} - sigma^2) * eps + sigma * z
    sigma   = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from composekit.core.options import check_integer, check_number
from composekit.errors import InputError, ModelError

__all__ = ["Scheduler", "DDIMScheduler", "StepCoefficients"]

_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class Scheduler(Protocol):
    """What the sampling loop needs from a scheduler: its timesteps and one update.

    A second scheduler (DPM-Solver, Euler, ...) implements these four methods and the loop in
    :mod:`composekit.core.sampler` runs it unchanged.
    """

    def max_steps(self) -> int:
        """The largest number of inference steps this schedule can take."""

    def timesteps(self, steps: int) -> np.ndarray:
        """Descending integer timesteps for ``steps`` inference steps."""

    def previous_timestep(self, t: int, steps: int) -> int:
        """The timestep the update from ``t`` lands on (negative after the last step)."""

    def step(self, model_output, t: int, sample, steps: int, eta: float = 0.0, noise=None):
        """One update ``x_t -> x_{t-1}``; returns ``(x_{t-1}, x0_hat)``. Any array type with ``+ - * /``."""

    def add_noise(self, x0, noise, t: int):
        """Forward diffusion of a clean sample to timestep ``t`` (``x0`` itself for ``t < 0``)."""


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one DDIM update from ``t`` to ``t_prev`` (python floats, exact float32 values)."""

    t: int
    t_prev: int
    sqrt_alpha: float  # sqrt(a_t)
    sqrt_one_minus_alpha: float  # sqrt(1 - a_t)
    sqrt_alpha_prev: float  # sqrt(a_{t-1})
    direction: float  # sqrt(1 - a_{t-1} - sigma^2)
    sigma: float  # eta * sqrt(variance)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 ``linspace`` rounded the way PyTorch's CPU kernel rounds it (diffusers builds betas so).

    Endpoints and step are float32; each element is formed in higher precision from whichever end
    is nearer, then rounded once. ``np.linspace(..., dtype=float32)`` differs in the last bit for
    about a third of the values, which DDIM amplifies by ``1/sqrt(a_t)`` at late steps.
    """
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    head = np.float64(a) + step * i
    tail = np.float64(b) - step * (n - 1 - i)
    return np.where(i < n // 2, head, tail).astype(np.float32)


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


@dataclass(frozen=True)
class DDIMScheduler:
    """The SD noise schedule and the DDIM step (Song et al., 2021), as diffusers computes them.

    Values are kept in float32 like diffusers' ``DDIMScheduler`` so that timesteps match exactly and
    updates match to float32 rounding.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        fix = "Fix scheduler/scheduler_config.json."
        try:  # the config file's values: a bad one is the model's problem (ModelError), not the caller's
            check_integer("num_train_timesteps", self.num_train_timesteps, 2, 100_000)
            check_integer("steps_offset", self.steps_offset, 0, self.num_train_timesteps // 2 - 1)
            for key in ("beta_start", "beta_end", "clip_sample_range"):
                value = check_number(key, getattr(self, key), 0.0, 1e3 if key == "clip_sample_range" else 1.0)
                if value in (0.0, 1.0 if key != "clip_sample_range" else 1e3):
                    raise InputError(f"{key} must be a number in (0, 1), got {value!r}")
        except InputError as exc:
            raise ModelError(f"scheduler {exc}. {fix}") from None
        for key in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, key), bool):
                raise ModelError(f"scheduler {key}={getattr(self, key)!r} must be true or false. {fix}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ModelError(
                f"scheduler beta_schedule={self.beta_schedule!r} is not supported; expected 'linear', "
                "'scaled_linear' or 'squaredcos_cap_v2'. Fix scheduler/scheduler_config.json."
            )
        if self.timestep_spacing not in _SPACINGS:
            raise ModelError(
                f"scheduler timestep_spacing={self.timestep_spacing!r} is not supported; expected one of "
                f"{_SPACINGS}. Fix scheduler/scheduler_config.json."
            )
        if self.prediction_type not in _PREDICTIONS:
            raise ModelError(
                f"scheduler prediction_type={self.prediction_type!r} is not supported; expected one of "
                f"{_PREDICTIONS}. Fix scheduler/scheduler_config.json."
            )
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = _linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = _linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:
            betas = np.array(
                [min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)],
                dtype=np.float32,
            )
        # The product is accumulated in float64 and rounded once, as PyTorch's cumprod does on the CPU.
        alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
        alphas_cumprod.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)
        final = np.float32(1.0) if self.set_alpha_to_one else alphas_cumprod[0]
        object.__setattr__(self, "final_alpha_cumprod", np.float32(final))

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDIMScheduler":
        """Build from a diffusers scheduler config dict (unknown keys are ignored).

        Options this implementation cannot honour (``thresholding``, ``trained_betas``,
        ``rescale_betas_zero_snr``) raise :class:`ModelError` rather than being ignored silently.
        """
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(key):
                raise ModelError(f"scheduler option {key}=true is not supported by composekit's DDIM sampler.")
        if config.get("trained_betas") is not None:
            raise ModelError("scheduler option trained_betas is not supported by composekit's DDIM sampler.")
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config}
        try:
            return cls(**fields)
        except TypeError as exc:  # wrong value types in the JSON
            raise ModelError(f"invalid scheduler config: {exc}") from exc

    # -- schedule ---------------------------------------------------------------------------------

    def max_steps(self) -> int:
        """The most inference steps whose timesteps all lie inside the schedule.

        With ``leading`` spacing and ``steps_offset=1`` (SD's configs) 1000 steps would ask for
        timestep 1000 of a 1000-step schedule, so the limit is 999 there.
        """
        n = self.num_train_timesteps
        if self.timestep_spacing != "leading":
            return n
        steps = n
        while steps > 1 and (steps - 1) * (n // steps) + self.steps_offset > n - 1:
            steps -= 1
        return steps

    def timesteps(self, steps: int) -> np.ndarray:
        """The descending integer timesteps for ``steps`` inference steps (diffusers' ``set_timesteps``)."""
        n = self.num_train_timesteps
        check_integer("steps", steps, 1, self.max_steps())
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = n // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        return ts.copy()

    def previous_timestep(self, t: int, steps: int) -> int:
        """``t - num_train_timesteps // steps`` (negative after the last step)."""
        return int(t) - self.num_train_timesteps // steps

    def alpha(self, t: int) -> float:
        """``a_t`` (``alphas_cumprod[t]``), or the final value for ``t < 0``."""
        return float(self.alphas_cumprod[t]) if t >= 0 else float(self.final_alpha_cumprod)

    def coefficients(self, t: int, steps: int, eta: float = 0.0) -> StepCoefficients:
        """Scalars of the DDIM update at timestep ``t`` of a ``steps``-step schedule."""
        t = int(t)
        t_prev = t - self.num_train_timesteps // steps
        a_t = np.float32(self.alphas_cumprod[t])
        a_prev = np.float32(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod
        one = np.float32(1.0)
        variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
        sigma = np.float32(eta) * variance ** np.float32(0.5)
        return StepCoefficients(
            t=t,
            t_prev=t_prev,
            sqrt_alpha=float(a_t ** np.float32(0.5)),
            sqrt_one_minus_alpha=float((one - a_t) ** np.float32(0.5)),
            sqrt_alpha_prev=float(a_prev ** np.float32(0.5)),
            direction=float((one - a_prev - sigma**2) ** np.float32(0.5)),
            sigma=float(sigma),
        )

    # -- update -----------------------------------------------------------------------------------

    def step(self, model_output, t: int, sample, steps: int, eta: float = 0.0, noise=None):
        """One DDIM update. Returns ``(x_{t-1}, x0_hat)``.

        Works on any array type with arithmetic operators and ``.clip`` (numpy, torch). ``noise`` is
        required when ``eta > 0`` (draw it on the CPU from the seed, so every backend sees the same).
        """
        c = self.coefficients(t, steps, eta)
        if self.prediction_type == "epsilon":
            x0 = (sample - c.sqrt_one_minus_alpha * model_output) / c.sqrt_alpha
            eps = model_output
        elif self.prediction_type == "v_prediction":
            x0 = c.sqrt_alpha * sample - c.sqrt_one_minus_alpha * model_output
            eps = c.sqrt_alpha * model_output + c.sqrt_one_minus_alpha * sample
        else:  # "sample"
            x0 = model_output
            eps = (sample - c.sqrt_alpha * x0) / c.sqrt_one_minus_alpha
        if self.clip_sample:
            # diffusers clips x0_hat only; eps stays the model's (use_clipped_model_output=False).
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
        prev = c.sqrt_alpha_prev * x0 + c.direction * eps
        if eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs `noise` of the sample's shape")
            prev = prev + c.sigma * noise
        return prev, x0

    def add_noise(self, x0, noise, t: int):
        """Forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) z`` (``t < 0``: the final alpha's mix)."""
        a = np.float32(self.alpha(int(t)))
        return float(a ** np.float32(0.5)) * x0 + float((np.float32(1.0) - a) ** np.float32(0.5)) * noise
