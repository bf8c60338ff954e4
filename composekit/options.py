"""The options of [`Compositor.paste`][composekit.Compositor.paste], as two small validated types (checked here and nowhere else).

- [`GenerativeOptions`][composekit.options.GenerativeOptions]: the model's sampler (steps, guidance, cut-off, decode mode), the
  context window and soft edge, and **fidelity control** (masked ILVR, see `composekit.sampler`).
- [`ClassicOptions`][composekit.options.ClassicOptions]: the weights-free method (colour transfer, contact shadow, soft edge).

Both are frozen dataclasses whose ``__post_init__`` raises [`InputError`][composekit.errors.InputError]
naming the option, the value and what is allowed. ``Compositor.paste`` builds them from its keyword
arguments; the CLI builds them from its flags; a caller may also build one and pass ``options=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

from .errors import InputError

__all__ = ["GenerativeOptions", "ClassicOptions", "fidelity_schedule", "MAX_STEPS", "MAX_FEATHER",
           "MAX_CONTEXT", "FIDELITY_MAX_FACTOR"]

MAX_STEPS = 1000  # also bounded by the model's schedule (see DDIMScheduler.max_steps)
MAX_FEATHER = 4096  # pixels; a wider soft edge than this is never useful and costs memory
MAX_CONTEXT = 64.0  # context window side / box side
FIDELITY_MAX_FACTOR = 16  # low-pass factor N (latent cells) at the lowest non-zero fidelity


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in {lo:g}..{hi:g}" if lo is not None and hi is not None else f">= {lo:g}" if lo is not None \
            else f"<= {hi:g}"
        raise InputError(f"{name} must be a number {bounds}, got {value!r}")
    return value


def _integer(name: str, value: Any, lo: int, hi: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or not lo <= int(value) <= hi:
        extra = " or None" if allow_none else ""
        raise InputError(f"{name} must be an integer in {lo}..{hi}{extra}, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def _set(obj: Any, **values: Any) -> None:
    for key, value in values.items():
        object.__setattr__(obj, key, value)


@dataclass(frozen=True)
class GenerativeOptions:
    """How the model composites. Every field is validated when the object is made.

    Attributes:
        steps: DDIM steps, 1..1000 (and at most what the model's schedule allows).
        guidance: classifier-free guidance scale (<= 1 disables it).
        eta: DDIM stochasticity, >= 0 (0 = deterministic DDIM).
        guidance_end: fraction of the steps (from the start) that use guidance, 0..1.
        decode: ``"window"`` (decode the whole context window) or ``"region"`` (only the edited cells
            plus a margin; needs a decoder that takes any size).
        context: context window side / box side, 1..64.
        feather: soft-edge width inside the region in pixels (None = 1/16 of the box's shorter side).
        fidelity: 0..1, how closely the region keeps the pasted object's own appearance (masked ILVR;
            0 = off, the plain sampler bit for bit; 1 = the naive paste, re-encoded). Maps to a
            low-pass factor and a fraction of steps, see [`fidelity_schedule`][composekit.options.fidelity_schedule].
        fidelity_factor: expert override of the low-pass factor ``N`` in latent cells (1..64).
        fidelity_steps: expert override of the fraction of steps the guidance runs for (0..1).
        progress: show a tqdm progress bar.
    """

    steps: int = 50
    guidance: float = 5.0
    eta: float = 0.0
    guidance_end: float = 1.0
    decode: str = "window"
    context: float = 2.0
    feather: int | None = None
    fidelity: float = 0.0
    fidelity_factor: int | None = None
    fidelity_steps: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _set(self,
             steps=_integer("steps", self.steps, 1, MAX_STEPS),
             guidance=_number("guidance", self.guidance, -1e6, 1e6),
             eta=_number("eta", self.eta, 0.0, 1e3),
             guidance_end=_number("guidance_end", self.guidance_end, 0.0, 1.0),
             decode=_choice("decode", self.decode, ("window", "region")),
             context=_number("context", self.context, 1.0, MAX_CONTEXT),
             feather=_integer("feather", self.feather, 0, MAX_FEATHER, allow_none=True),
             fidelity=_number("fidelity", self.fidelity, 0.0, 1.0),
             fidelity_factor=_integer("fidelity_factor", self.fidelity_factor, 1, 64, allow_none=True),
             fidelity_steps=None if self.fidelity_steps is None
             else _number("fidelity_steps", self.fidelity_steps, 0.0, 1.0),
             progress=bool(self.progress))

    @property
    def ilvr(self) -> tuple[int, float] | None:
        """``(N, fraction of steps)`` of the fidelity guidance, or None when it is off."""
        factor, fraction = fidelity_schedule(self.fidelity)
        if self.fidelity_factor is not None:
            factor = self.fidelity_factor
        if self.fidelity_steps is not None:
            fraction = self.fidelity_steps
        if fraction <= 0.0 or (self.fidelity == 0.0 and self.fidelity_steps is None):
            return None
        return factor, fraction


def fidelity_schedule(fidelity: float) -> tuple[int, float]:
    """``fidelity`` (0..1) -> (low-pass factor ``N`` in latent cells, fraction of steps guided).

    The fraction is ``fidelity`` itself; ``N`` halves from `FIDELITY_MAX_FACTOR` (16 cells,
    128 pixels at SD's scale: only the coarsest colour and layout are kept) down to 1 (every
    frequency) as fidelity goes from 0 to 1: 0.25 -> (8, 0.25), 0.5 -> (4, 0.5), 0.75 -> (2, 0.75),
    1 -> (1, 1.0). Larger ``N`` and fewer steps leave the model more freedom (harmony); smaller
    ``N`` and more steps keep more of the object (fidelity).
    """
    levels = math.log2(FIDELITY_MAX_FACTOR)
    factor = int(2 ** round(levels * (1.0 - float(fidelity))))
    return factor, float(fidelity)


@dataclass(frozen=True)
class ClassicOptions:
    """How the weights-free method composites (see `composekit.classic`).

    Attributes:
        harmonize: colour-transfer strength, 0..1.
        shadow: contact-shadow darkness, 0..1.
        feather: soft-edge width in pixels (None = 2).
    """

    harmonize: float = 0.5
    shadow: float = 0.35
    feather: int | None = None

    def __post_init__(self) -> None:
        _set(self,
             harmonize=_number("harmonize", self.harmonize, 0.0, 1.0),
             shadow=_number("shadow", self.shadow, 0.0, 1.0),
             feather=_integer("feather", self.feather, 0, MAX_FEATHER, allow_none=True))


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}
