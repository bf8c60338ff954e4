"""Every option composekit takes, declared once, and the one validator that checks them.

An option is a dataclass field made with :func:`option`: its default, type, range or choices, which
methods it applies to, its help text and (derived from its name) its command-line flag. Everything
else is derived from these declarations:

- [`GenerativeOptions`][composekit.core.options.GenerativeOptions] and
  [`ClassicOptions`][composekit.core.options.ClassicOptions], the validated values ``paste`` runs with
  (both are [`PasteOptions`][composekit.core.options.PasteOptions]: one declaration per option);
- the keywords of ``Compositor.paste`` / ``paste_batch`` and their checks (:func:`resolve`);
- the CLI's flags for ``paste``, ``batch`` and ``serve`` (``composekit.apps.cli``), the HTTP service's
  form fields and OpenAPI description (``composekit.apps.serve``), the service's and Ray's settings.

Numbers, integers and choices everywhere in composekit (backend loaders, scheduler, exporter) are
checked by :func:`check_number`, :func:`check_integer` and :func:`check_choice`, which raise
[`InputError`][composekit.errors.InputError] naming the option, the value and what is allowed.

Adding a paste option is one :func:`option` field in ``PasteOptions`` plus the code that uses it.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from composekit.errors import InputError

__all__ = ["PasteOptions", "GenerativeOptions", "ClassicOptions", "Spec", "option", "Declared", "resolve",
           "fidelity_schedule", "check_number", "check_integer", "check_choice", "check_bool", "SEED", "THREADS",
           "METHODS", "MAX_STEPS", "MAX_FEATHER", "MAX_CONTEXT", "FIDELITY_MAX_FACTOR",
           "MAX_TOKEN_DOWNSAMPLING"]

METHODS = ("generative", "classic")
MAX_STEPS = 1000  # also bounded by the model's schedule (see DDIMScheduler.max_steps)
MAX_FEATHER = 4096  # pixels; a wider soft edge than this is never useful and costs memory
MAX_CONTEXT = 64.0  # context window side / box side
FIDELITY_MAX_FACTOR = 16  # low-pass factor N (latent cells) at the lowest non-zero fidelity
MAX_SEED = 2**63 - 1
MAX_TOKEN_DOWNSAMPLING = 4  # token downsampling factor: 1/16 of the keys; quality falls off beyond 2-3 at 512 px


# -- the one validator ---------------------------------------------------------------------------------


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"in {lo:g}..{hi:g}"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}" if hi is not None else ""


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 nullable: bool = False) -> float | None:
    """``value`` as a finite float in ``lo..hi`` (either bound may be None), or InputError."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number{' or None' if nullable else ''}, got {_shown(value)}")
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{name} must be a number {_range(lo, hi)}{' or None' if nullable else ''}, "
                         f"got {_shown(value)}")
    return value


def check_integer(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
                  nullable: bool = False) -> int | None:
    """``value`` as an int in ``lo..hi`` (either bound may be None), or InputError."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or (lo is not None and int(value) < lo) \
            or (hi is not None and int(value) > hi):
        bounds = _range(lo, hi)
        raise InputError(f"{name} must be an integer{' ' + bounds if bounds else ''}"
                         f"{' or None' if nullable else ''}, got {_shown(value)}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, nullable: bool = False) -> str | None:
    """``value`` if it is one of ``choices``, or InputError."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(repr(c) for c in choices)}"
                         f"{' or None' if nullable else ''}; got {_shown(value)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, or InputError."""
    if not isinstance(value, (bool,)) and type(value).__name__ != "bool_":
        raise InputError(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: bad input is never echoed back at length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


# -- declarations --------------------------------------------------------------------------------------

_INT_TEXT = re.compile(r"[+-]?[0-9]+(\.0+)?")  # "3.0" is an integer (as in JSON)
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Spec:
    """One option's declaration (see :func:`option`); ``name`` and ``kind`` come from its field."""

    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS  # the compositing methods it applies to
    flag: str | None = None  # the CLI flag; None = derived from the name ("--guidance-end")
    cli: bool = True  # whether the CLI and the HTTP service offer it
    name: str = ""
    kind: type = object  # int, float, str or bool
    nullable: bool = False
    default: Any = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The validated value (InputError names the option, the value and what is allowed)."""
        if self.kind is bool:
            return check_bool(self.name, value)
        if self.kind is int:
            lo = None if self.lo is None else int(self.lo)
            hi = None if self.hi is None else int(self.hi)
            return check_integer(self.name, value, lo, hi, nullable=self.nullable)
        if self.kind is float:
            return check_number(self.name, value, self.lo, self.hi, nullable=self.nullable)
        if self.choices is not None:
            return check_choice(self.name, value, self.choices, nullable=self.nullable)
        if value is None and self.nullable:
            return None
        if not isinstance(value, self.kind):
            raise InputError(f"{self.name} must be a {self.kind.__name__}, got {_shown(value)}")
        return value

    def parse(self, text: str) -> Any:
        """The value of a command-line or form text, checked as :meth:`check` does."""
        return self.check(self.from_text(text))

    def from_text(self, text: str) -> Any:
        """The typed value of a command-line or form text, not yet range-checked: plain ASCII numbers only
        (no ``1_0``, no spaces, no other scripts' digits), ``none`` for a nullable option."""
        if not isinstance(text, str):
            return text
        if self.nullable and text.lower() in ("none", "null"):
            return None
        if self.kind is int and not (_INT_TEXT.fullmatch(text) and len(text) <= 25):
            raise InputError(f"{self.name} must be an integer {self.describe_range()}, got {_shown(text)}")
        if self.kind is float and not (_FLOAT_TEXT.fullmatch(text) and len(text) <= 40):
            raise InputError(f"{self.name} must be a number {self.describe_range()}, got {_shown(text)}")
        if self.kind is int:
            return int(text.split(".")[0])
        if self.kind is float:
            return float(text)
        if self.kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise InputError(f"{self.name} must be true or false, got {_shown(text)}")
        return text

    def describe_range(self) -> str:
        return _range(self.lo, self.hi)

    def describe(self) -> str:
        """One line for help texts: what it does, what it takes, its default."""
        takes = (f"one of {', '.join(self.choices)}" if self.choices else
                 f"{'integer' if self.kind is int else 'number'} {self.describe_range()}".strip()
                 if self.kind in (int, float) else "")
        default = "" if self.kind is bool or self.default is None else f"default {self.default}"
        extra = "; ".join(x for x in (takes, default) if x)
        return f"{self.help} ({extra})" if extra else self.help


def option(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,  # noqa: A002
           choices: tuple[str, ...] | None = None, methods: tuple[str, ...] = METHODS, flag: str | None = None,
           cli: bool = True) -> Any:
    """A dataclass field that declares an option (see the module's docstring)."""
    return field(default=default, metadata={"spec": Spec(help, lo, hi, choices, methods, flag, cli)})


def _field_specs(cls: type) -> dict[str, Spec]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        spec = f.metadata.get("spec")
        if spec is None:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        kind = args[0] if nullable and len(args) == 1 else hint
        if typing.get_origin(kind) is not None:
            kind = object  # e.g. a union of several types: checked by the class itself
        default = None if f.default is MISSING else f.default
        out[f.name] = Spec(**{**spec.__dict__, "name": f.name, "kind": kind, "nullable": nullable,
                              "default": default})
    return out


class Declared:
    """Base of the frozen dataclasses whose fields are :func:`option` declarations: validates every
    field when the object is made (``specs()`` lists the declarations)."""

    def __post_init__(self) -> None:
        for name, spec in type(self).specs().items():
            object.__setattr__(self, name, spec.check(getattr(self, name)))

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        cached = cls.__dict__.get("_specs")
        if cached is None:
            cached = _field_specs(cls)
            setattr(cls, "_specs", cached)
        return cached

    @classmethod
    def from_given(cls, given: dict[str, Any], what: str = "option") -> Any:
        """Build from keyword values, refusing unknown names (with the known ones listed)."""
        specs = cls.specs()
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise InputError(f"unknown {what}(s) {_shown(unknown)}; known: {', '.join(sorted(specs))}")
        return cls(**given)


# -- the paste options ---------------------------------------------------------------------------------

GEN, CLASSIC = ("generative",), ("classic",)
FAST_CACHE_INTERVAL = 3  # speed="fast": one full U-Net pass in 3 (DeepCache's setting for its 2.3x on SD 1.5)


@dataclass(frozen=True)
class PasteOptions(Declared):
    """Every option of ``Compositor.paste``, declared once; use
    [`GenerativeOptions`][composekit.core.options.GenerativeOptions] or
    [`ClassicOptions`][composekit.core.options.ClassicOptions], which refuse the options of the other method."""

    steps: int = option(50, "DDIM steps (at most what the model's schedule allows)", lo=1, hi=MAX_STEPS, methods=GEN)
    guidance: float = option(5.0, "classifier-free guidance scale (<= 1 disables it)", lo=-1e6, hi=1e6, methods=GEN)
    eta: float = option(0.0, "DDIM stochasticity: 0 = deterministic DDIM, 1 = DDPM-like (above 1 the update has "
                        "no real solution)", lo=0.0, hi=1.0, methods=GEN)
    guidance_end: float = option(1.0, "fraction of the steps, from the start, that use guidance; later steps run one "
                                 "U-Net pass", lo=0.0, hi=1.0, methods=GEN)
    cache_interval: int = option(1, "feature caching: a full U-Net pass every N steps and, in between, a shallow pass "
                                 "that reuses its deep features (1 = off; 3 is about 2x faster per step, at some "
                                 "cost in quality)", lo=1, hi=MAX_STEPS, methods=GEN)
    speed: str = option("default", "a named speed/quality trade: 'fast' = feature caching at cache_interval 3 (unless "
                        "another interval is given), the tiny decoder when the model holds one (an export made with "
                        "--tiny-vae), and the export's int8 U-Net when it was made with --int8", choices=("default", "fast"),
                        methods=GEN)
    decode: str = option("window", "decode the whole context window, or only the edited region's cells plus a "
                         "64-pixel margin (needs a decoder that takes any size: torch, OpenVINO)", choices=("window", "region"),
                         methods=GEN)
    context: float = option(2.0, "side of the square context window the model sees, in multiples of the box's "
                            "longer side", lo=1.0, hi=MAX_CONTEXT, methods=GEN)
    fidelity: float = option(0.0, "how much of the object's own appearance the region keeps (masked ILVR towards "
                             "the naive paste); 0 = off, 1 = the naive paste", lo=0.0, hi=1.0, methods=GEN)
    fidelity_factor: int | None = option(None, "expert: the low-pass factor N (latent cells) fidelity maps to",
                                         lo=1, hi=64, methods=GEN)
    fidelity_steps: float | None = option(None, "expert: the fraction of steps fidelity guides", lo=0.0, hi=1.0,
                                          methods=GEN)
    region: str = option("box", "editable region: the whole box (or mask), or a cut-out's silhouette grown by "
                         "margin pixels", choices=("box", "silhouette"))
    margin: int | None = option(None, "silhouette growth in pixels (None = 1/8 of the box's shorter side, at "
                                "least 2)", lo=0, hi=MAX_FEATHER)
    feather: int | None = option(None, "soft-edge width inside the region in pixels; 0 = hard edge (None = 1/16 "
                                 "of the box's shorter side; 2 for the classic method)", lo=0, hi=MAX_FEATHER)
    harmonize: float = option(0.5, "colour-transfer strength", lo=0.0, hi=1.0, methods=CLASSIC)
    shadow: float = option(0.35, "contact-shadow darkness", lo=0.0, hi=1.0, methods=CLASSIC)
    progress: bool = option(True, "show a tqdm progress bar", cli=False)

    method = "any"  # the method these options are for: set by the two subclasses

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speed == "fast" and self.cache_interval == 1:
            object.__setattr__(self, "cache_interval", FAST_CACHE_INTERVAL)
        if self.method in METHODS:
            for name, spec in self.specs().items():
                if self.method not in spec.methods and getattr(self, name) != spec.default:
                    raise InputError(not_for_method(name, self.method))

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


@dataclass(frozen=True)
class GenerativeOptions(PasteOptions):
    """How the model composites: [`PasteOptions`][composekit.core.options.PasteOptions] that refuse the
    classic method's options (``harmonize``, ``shadow``)."""

    method = "generative"


@dataclass(frozen=True)
class ClassicOptions(PasteOptions):
    """How the weights-free method composites (see ``composekit.core.classic``):
    [`PasteOptions`][composekit.core.options.PasteOptions] that refuse the model's options (``steps``,
    ``guidance``, ``fidelity``, ...)."""

    method = "classic"


OPTION_TYPES = {"generative": GenerativeOptions, "classic": ClassicOptions}

# Keywords of paste that are not fields of the option types, declared the same way.
SEED = Spec("seed of all noise (drawn on the CPU); none draws one, reported in the result", lo=0, hi=MAX_SEED,
            methods=GEN, name="seed", kind=int, nullable=True, default=None)
THREADS = Spec("CPU threads of the runtime (None = its default, one per core)", lo=1, hi=1024, name="threads",
               kind=int, nullable=True, default=None)


def not_for_method(name: str, method: str) -> str:
    """The one message for an option the chosen method does not use (Python, CLI and HTTP alike)."""
    if method == "classic":
        return (f"{name} applies to the generative method only, and this composite uses the classic method (no "
                "model loaded, or method='classic'); drop it, or load a model for generative compositing")
    return (f"{name} applies to the classic method only, and this composite uses the generative method; drop "
            "it, or pass method='classic'")


def resolve(method: str, given: dict[str, Any]) -> PasteOptions:
    """The validated options for ``method`` from keyword values as a caller passed them: an unknown name
    or an option of the other method is refused (even at its default value: it would do nothing)."""
    check_choice("method", method, METHODS)
    specs = PasteOptions.specs()
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise InputError(f"unknown option(s) {_shown(unknown)}; paste's options are {', '.join(sorted(specs))}")
    for name in given:
        if method not in specs[name].methods:
            raise InputError(not_for_method(name, method))
    return OPTION_TYPES[method](**given)


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


def options_table() -> str:
    """The paste options as a Markdown table (docs/options.md is this, checked by a test)."""
    rows = ["| option | CLI flag / form field | applies to | takes | default | what it does |",
            "|---|---|---|---|---|---|"]
    for spec in PasteOptions.specs().values():
        takes = (" / ".join(f"`{c}`" for c in spec.choices) if spec.choices else
                 f"{'integer' if spec.kind is int else 'number' if spec.kind is float else spec.kind.__name__} "
                 f"{spec.describe_range()}".strip()) + (" or none" if spec.nullable else "")
        flag = f"`{spec.cli_flag}` / `{spec.name}`" if spec.cli else "(Python only)"
        rows.append(f"| `{spec.name}` | {flag} | {', '.join(spec.methods)} | {takes} | `{spec.default!r}` | "
                    f"{spec.help} |")
    return "\n".join(rows) + "\n"
