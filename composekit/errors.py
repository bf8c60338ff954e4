"""composekit's exception hierarchy.

Every error composekit raises on purpose derives from :class:`ComposekitError`. Messages say what
was wrong, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ComposekitError",
    "InputError",
    "ModelError",
    "ModelNotFoundError",
    "UnsafeModelFileError",
    "BackendUnavailableError",
    "EngineIncompatibleError",
    "NumericalError",
]


class ComposekitError(Exception):
    """Base class of every error composekit raises deliberately."""


class InputError(ComposekitError, ValueError):
    """A caller-supplied argument (image, box, mask, option) is invalid."""


class ModelError(ComposekitError):
    """A model directory, config or weight file is missing, malformed or unsupported."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model source could not be found locally and could not be downloaded."""


class UnsafeModelFileError(ModelError):
    """A model component exists only in a format composekit refuses to load (e.g. pickle)."""


class BackendUnavailableError(ComposekitError, RuntimeError):
    """The requested backend or device cannot be used in this environment."""


class EngineIncompatibleError(ComposekitError):
    """An exported engine was built for another runtime version or GPU and must be rebuilt."""


class NumericalError(ComposekitError, ArithmeticError):
    """Non-finite values (NaN/inf) appeared during sampling or decoding."""
