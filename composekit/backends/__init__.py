"""Backend registry. Each backend module imports its heavy dependency only when it is loaded."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError
from .base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo", "BACKENDS", "load_backend", "choose_backend"]

logger = logging.getLogger(__name__)

# name -> (module, loader function, the pip extra that provides it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("composekit.backends.torch_backend", "load", "composekit[torch]"),
}


def choose_backend(requested: str, model_dir: Path) -> str:
    """Resolve ``"auto"``; an explicit name always wins (and is checked)."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise InputError(f"unknown backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        return requested
    choice = "torch"
    logger.info("backend='auto' chose %r for %s", choice, model_dir)
    return choice


def load_backend(name: str, model_dir: Path, **options: Any) -> Backend:
    """Import backend ``name`` and load the model in ``model_dir`` with it."""
    module_name, func, extra = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed ({exc.name or exc}); "
            f"install it with `pip install '{extra}'`"
        ) from exc
    return getattr(module, func)(model_dir, **options)
