"""composekit: generative object compositing with an exact-background guarantee.

    from composekit import Compositor
    comp = Compositor.from_pretrained("Fantasy-Studio/Paint-by-Example")
    result = comp.paste(obj, bg, box=(x0, y0, x1, y1), seed=0)
    result.image.save("out.png")

Importing composekit does not import torch; backends load their heavy dependencies on use.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from composekit.compositor import CompositeResult, Compositor
from composekit.core.options import ClassicOptions, GenerativeOptions
from composekit.errors import (
    BackendUnavailableError,
    ComposekitError,
    EngineIncompatibleError,
    InputError,
    ModelError,
    ModelNotFoundError,
    NumericalError,
    OutputError,
    UnsafeModelFileError,
)

try:
    __version__ = version("composekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Compositor",
    "CompositeResult",
    "GenerativeOptions",
    "ClassicOptions",
    "ComposekitError",
    "InputError",
    "ModelError",
    "ModelNotFoundError",
    "UnsafeModelFileError",
    "BackendUnavailableError",
    "EngineIncompatibleError",
    "NumericalError",
    "OutputError",
    "__version__",
]
