"""Writing a model directory (one folder per component, and ``model_index.json``) atomically.

Used by the random-model builder and by the checkpoint converters. The directory is assembled in a
temporary folder beside the target and renamed into place (:func:`composekit.formats.atomic.atomic_directory`),
so a failure never leaves a half-written model that would load.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from composekit.formats.atomic import atomic_directory

__all__ = ["write_model_dir"]


def write_model_dir(out_dir: str | os.PathLike, components: Mapping[str, Any], index: Mapping[str, Any],
                    overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> Path:
    """Save every component with its ``save_pretrained`` (safetensors), write ``model_index.json`` and
    any ``extra_files`` (name -> text), then move the whole directory into place."""
    from composekit.backends.torch_backend import quiet_loading

    with atomic_directory(out_dir, overwrite) as tmp:
        with quiet_loading(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' torchvision-fallback notice on processors
            for name, component in components.items():
                kwargs = {"safe_serialization": True} if hasattr(component, "parameters") else {}
                component.save_pretrained(tmp / name, **kwargs)
        (tmp / "model_index.json").write_text(json.dumps(dict(index), indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)
