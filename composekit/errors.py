"""composekit's exception hierarchy.

Every error composekit raises on purpose derives from [`ComposekitError`][composekit.errors.ComposekitError]. Messages say what
was wrong, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "install_hint",
    "ComposekitError",
    "InputError",
    "ModelError",
    "ModelNotFoundError",
    "UnsafeModelFileError",
    "BackendUnavailableError",
    "EngineIncompatibleError",
    "NumericalError",
    "OutputError",
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


class OutputError(ComposekitError, OSError):
    """An output could not be written (e.g. no space left on its device); nothing partial was left behind."""


# The CPU build of PyTorch the project is developed and tested with; on a GPU machine install the CUDA
# build you want first (see the GPU page of the docs).
TORCH_PIN = "torch==2.13.0"


def install_hint(extra: str) -> str:
    """How to install one of composekit's extras, for error messages (composekit is installed from a
    checkout or a wheel built from one, not from a package index)."""
    if extra == "gpu":
        return ("ONNX Runtime's GPU package replaces the CPU one: `pip uninstall -y onnxruntime && pip install "
                "onnxruntime-gpu` (the GPU page of the docs says which build matches CUDA 12 or 13)")
    first = f"`pip install {TORCH_PIN}` (or the CUDA build you want) first, then " if extra in ("torch", "export") \
        else ""
    return (f"{first}install the {extra} extra: `pip install \".[{extra}]\"` in a composekit checkout, or "
            f"`pip install \"composekit-VERSION-py3-none-any.whl[{extra}]\"` with a wheel built from one")
