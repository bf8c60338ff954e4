"""Reading the files of a model, export or engine directory safely, and checking JSON against schemas.

Every JSON file composekit reads (``model_index.json``, component configs, an export's
``manifest.json``, ``engines.json``, engine sidecars) goes through :func:`read_json`:

- the path must stay inside the directory it belongs to (:func:`inside`: no absolute names, no
  ``..``, no symlink that resolves outside — a Hugging Face cache snapshot may point into its own
  repo's ``blobs/`` folder, nothing further);
- it must be a regular file (a FIFO, a device such as ``/dev/zero`` or a directory is refused before
  it is read; the file is opened non-blocking, so a FIFO cannot hang the caller);
- at most :data:`MAX_JSON_BYTES` are read, and nesting deeper than :data:`MAX_JSON_DEPTH` is refused;
- the top level is an object whose fields match a declared :class:`Schema` (types, ranges, required
  keys); unknown keys are allowed, since diffusers and transformers add keys with every release.

A small typed reader rather than a schema library: the rules are few, the messages must name the
file, the key, the value and the fix, and the runtime must stay free of extra dependencies.
Every failure is a :class:`~composekit.errors.ModelError`.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from composekit.core.options import MAX_TOKEN_DOWNSAMPLING
from composekit.errors import ModelError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "Field", "Schema", "read_json", "inside", "regular_file",
           "check", "SCHEMAS", "allowed_root"]

MAX_JSON_BYTES = 16 * 1024 * 1024  # the largest config or manifest composekit reads
MAX_JSON_DEPTH = 32  # nesting deeper than this is refused (real configs nest 3-4 levels)


def allowed_root(root: Path) -> Path:
    """The folder a model's files may resolve into: the directory itself, or for a Hugging Face cache
    snapshot (``.../models--org--name/snapshots/REV``) the repo's cache folder, whose ``blobs/`` its
    symlinks point into."""
    root = Path(root)
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def inside(root: Path, name: str | os.PathLike, what: str = "file", directory: str = "directory") -> Path:
    """``root / name``, refusing absolute names, ``..``, and paths that resolve outside the root.

    (For a Hub snapshot the root is widened by :func:`allowed_root`.)
    """
    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
    if not text or os.path.isabs(text) or ".." in Path(text).parts or "\x00" in text:
        raise ModelError(f"{root}: {what} name {name!r} must be a plain name inside the {directory}")
    path = Path(root) / text
    base = allowed_root(Path(root)).resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise ModelError(f"{path} cannot be resolved ({exc}); refusing to read it") from None
    if not resolved.is_relative_to(base):
        raise ModelError(f"{path} leads outside the {directory} {base} (to {resolved}); refusing to read it")
    return path


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """``stat`` of ``path`` after checking it is a regular file (not a FIFO, device, socket or folder)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (FIFO, device or socket)"
        raise ModelError(f"{what} {path} is {kind}; expected a regular file. Restore it from the model's source")
    return info


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping early once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def read_json(path: Path, *, missing: str | None = None, fix: str = "restore the file from the model's source",
              schema: "Schema | None" = None) -> dict[str, Any]:
    """A JSON object from ``path`` (a regular file of at most :data:`MAX_JSON_BYTES`), checked against
    ``schema``; every failure is a :class:`ModelError` (``missing`` / ``fix`` word it)."""
    path = Path(path)
    try:
        info = regular_file(path, "JSON file")
    except FileNotFoundError:
        raise ModelError(missing or f"missing file {path}") from None
    if info.st_size > MAX_JSON_BYTES:
        raise ModelError(f"{path} is {info.st_size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for a config; "
                         f"{fix}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped between stat and open
                raise ModelError(f"{path} is not a regular file; {fix}")
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ModelError(f"{path} is over the {MAX_JSON_BYTES:,}-byte limit for a config; {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ModelError(f"{path} nests deeper than JSON parsing allows; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object, got {type(data).__name__}; {fix}")
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ModelError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels; {fix}")
    if schema is not None:
        check(data, schema, str(path), fix)
    return data


# -- schemas ----------------------------------------------------------------------------------------

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Field:
    """One key of a JSON object: allowed JSON types, whether it must be present, and a value check."""

    types: tuple[str, ...]  # JSON types: "int", "number", "str", "bool", "list", "object", "null"
    required: bool = False
    check: Check | None = None
    expect: str = ""  # what a valid value looks like, for the message


Schema = Mapping[str, Field]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def check(data: Mapping[str, Any], schema: Schema, where: str, fix: str) -> None:
    """Raise :class:`ModelError` for the first key of ``data`` that breaks ``schema``."""
    for key, spec in schema.items():
        if key not in data:
            if spec.required:
                raise ModelError(f"{where} lacks {key!r} ({spec.expect or ' or '.join(spec.types)}); {fix}")
            continue
        value = data[key]
        kind = _json_type(value)
        if kind not in spec.types and not (kind == "int" and "number" in spec.types):
            raise ModelError(f"{where}: {key!r} is {value!r} ({kind}); expected {spec.expect or ' or '.join(spec.types)}."
                             f" {fix[0].upper() + fix[1:]}")
        if spec.check is not None and value is not None:
            try:
                ok = spec.check(value)
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise ModelError(f"{where}: {key!r} is {value!r}; expected {spec.expect}. {fix[0].upper() + fix[1:]}")


def _int_in(lo: int, hi: int) -> Check:
    return lambda v: lo <= v <= hi


def _num_in(lo: float, hi: float, open_lo: bool = False) -> Check:
    return lambda v: math.isfinite(v) and (lo < v if open_lo else lo <= v) and v <= hi


def _ints(lo: int, hi: int, n_lo: int = 1, n_hi: int = 16) -> Check:
    return lambda v: n_lo <= len(v) <= n_hi and all(type(x) is int and lo <= x <= hi for x in v)


def _numbers(n: int, lo: float, hi: float, open_lo: bool = False) -> Check:
    return lambda v: len(v) == n and all(_json_type(x) in ("int", "number") and _num_in(lo, hi, open_lo)(x)
                                         for x in v)


def _strs(n_lo: int = 1, n_hi: int = 16) -> Check:
    return lambda v: n_lo <= len(v) <= n_hi and all(isinstance(x, str) for x in v)


def _size(v: Any) -> bool:
    """A CLIP processor size: an int, {"shortest_edge": n} or {"height": n, "width": n} (n in 1..4096)."""
    if type(v) is int:
        return 1 <= v <= 4096
    if isinstance(v, dict):
        values = [v[k] for k in ("shortest_edge", "height", "width") if k in v]
        return bool(values) and all(type(x) is int and 1 <= x <= 4096 for x in values)
    return False


_DIM = _int_in(1, 16384)
MAX_LAYERS = 64  # layers per block: a larger count only makes a config take minutes to build (SD uses 1-2, SDXL 10)


def _layer_counts(v: Any) -> bool:
    """A layer count, or a (nested) list of them, each in 1..MAX_LAYERS."""
    if isinstance(v, list):
        return 1 <= len(v) <= 16 and all(_layer_counts(x) for x in v)
    return type(v) is int and 1 <= v <= MAX_LAYERS


_LAYERS = Field(("int", "list"), False, _layer_counts, f"an integer in 1..{MAX_LAYERS} or a list of them")
_RGB = _numbers(3, 0, 255)
_BACKDROP = Field(("list",), check=lambda v: _RGB(v) and all(type(x) is int for x in v),
                  expect="[r, g, b] integers in 0..255")

def _file_entry(x: Any) -> bool:
    """A file as a manifest lists it: an object with a ``file`` name and its ``sha256``."""
    return isinstance(x, dict) and isinstance(x.get("file"), str) and isinstance(x.get("sha256"), str)


SCHEMAS: dict[str, Schema] = {
    "model_index": {
        "_class_name": Field(("str",), True, expect="a pipeline class name such as 'PaintByExamplePipeline'"),
        "cutout_backdrop": _BACKDROP,
        "adaptor_kind": Field(("str",), expect="'mapper' or 'conv1d'"),
    },
    "unet": {
        "in_channels": Field(("int",), True, _int_in(1, 64), "an integer in 1..64"),
        "out_channels": Field(("int",), False, _int_in(1, 64), "an integer in 1..64"),
        "sample_size": Field(("int",), True, _int_in(1, 1024), "the latent side, an integer in 1..1024"),
        "cross_attention_dim": Field(("int",), True, _DIM, "an integer in 1..16384"),
        "block_out_channels": Field(("list",), False, _ints(1, 16384), "a list of 1..16 positive integers"),
        "layers_per_block": _LAYERS,
        "transformer_layers_per_block": _LAYERS,
        "reverse_transformer_layers_per_block": Field(("list", "null"), False, _layer_counts,
                                                      f"null or a list of integers in 1..{MAX_LAYERS}"),
    },
    "vae": {
        "latent_channels": Field(("int",), False, _int_in(1, 64), "an integer in 1..64"),
        "block_out_channels": Field(("list",), True, _ints(1, 16384, 1, 8), "a list of 1..8 positive integers"),
        "scaling_factor": Field(("number",), False, _num_in(0, 1e3, open_lo=True), "a positive number"),
        "sample_size": Field(("int",), False, _int_in(1, 16384), "an integer in 1..16384"),
        "layers_per_block": _LAYERS,
    },
    "image_encoder": {
        "hidden_size": Field(("int",), True, _DIM, "an integer in 1..16384"),
        "projection_dim": Field(("int",), False, _DIM, "an integer in 1..16384"),
        "image_size": Field(("int",), False, _int_in(1, 4096), "an integer in 1..4096"),
        "patch_size": Field(("int",), False, _int_in(1, 4096), "an integer in 1..4096"),
        "num_hidden_layers": Field(("int",), False, _int_in(1, 256), "an integer in 1..256"),
    },
    "adaptor": {
        "width": Field(("int",), False, _DIM, "an integer in 1..16384"),
        "context_dim": Field(("int",), False, _DIM, "an integer in 1..16384"),
        "tokens_in": Field(("int",), False, _int_in(1, 4096), "an integer in 1..4096"),
        "tokens_out": Field(("int",), False, _int_in(1, 4096), "an integer in 1..4096"),
        "kind": Field(("str",), False, expect="'mapper' or 'conv1d'"),
        "num_blocks": Field(("int",), False, _int_in(1, MAX_LAYERS), f"an integer in 1..{MAX_LAYERS}"),
    },
    "tiny_vae": {
        "num_encoder_blocks": Field(("list",), False, _layer_counts, f"a list of integers in 1..{MAX_LAYERS}"),
        "num_decoder_blocks": Field(("list",), False, _layer_counts, f"a list of integers in 1..{MAX_LAYERS}"),
    },
    "scheduler": {
        "num_train_timesteps": Field(("int",), False, _int_in(2, 100_000), "an integer in 2..100000"),
        "beta_start": Field(("number",), False, _num_in(0, 1, open_lo=True), "a number in (0, 1)"),
        "beta_end": Field(("number",), False, _num_in(0, 1, open_lo=True), "a number in (0, 1)"),
        "beta_schedule": Field(("str",), False, expect="'linear', 'scaled_linear' or 'squaredcos_cap_v2'"),
        "steps_offset": Field(("int",), False, _int_in(0, 50_000), "a small non-negative integer"),
        "set_alpha_to_one": Field(("bool",), expect="true or false"),
        "clip_sample": Field(("bool",), expect="true or false"),
        "timestep_spacing": Field(("str",), expect="'leading', 'trailing' or 'linspace'"),
        "prediction_type": Field(("str",), expect="'epsilon', 'v_prediction' or 'sample'"),
    },
    "feature_extractor": {
        "size": Field(("int", "object"), False, _size, "a square size (an integer, or {'shortest_edge': n}) in 1..4096"),
        "crop_size": Field(("int", "object"), False, _size, "a square size in 1..4096"),
        "resample": Field(("int",), False, _int_in(0, 5), "a Pillow resampling filter number, 0..5"),
        "image_mean": Field(("list",), False, _numbers(3, -10, 10), "three numbers"),
        "image_std": Field(("list",), False, _numbers(3, 0, 10, open_lo=True), "three positive numbers"),
        "rescale_factor": Field(("number",), False, _num_in(0, 1, open_lo=True), "a number in (0, 1]"),
        "do_resize": Field(("bool",), expect="true or false"),
        "do_center_crop": Field(("bool",), expect="true or false"),
        "do_normalize": Field(("bool",), expect="true or false"),
        "do_rescale": Field(("bool",), expect="true or false"),
    },
    "manifest": {
        "format": Field(("str",), True, expect="'composekit-onnx'"),
        "format_version": Field(("int",), True, expect="an integer"),
        "source": Field(("object",), True, lambda v: isinstance(v.get("family"), str), "an object with 'family'"),
        "dims": Field(("object",), True, expect="an object of model dimensions"),
        "precision": Field(("str",), True, lambda v: v in ("fp32", "fp16"), "'fp32' or 'fp16'"),
        "dynamic_spatial": Field(("bool",), expect="true or false"),
        "max_batch": Field(("int",), False, _int_in(1, 256), "an integer in 1..256"),
        "optimized": Field(("str", "null"), False, lambda v: v in (None, "cpu", "cuda"), "null, 'cpu' or 'cuda'"),
        "tiny_vae": Field(("str", "null"), expect="null or where the tiny decoder came from"),
        "int8": Field(("object", "null"), False, lambda v: all(isinstance(x, dict) for x in v.values()),
                      expect="null or an object: component -> how it was quantized"),
        "token_downsampling": Field(("int",), False, _int_in(1, MAX_TOKEN_DOWNSAMPLING),
                                    f"an integer in 1..{MAX_TOKEN_DOWNSAMPLING}"),
        "single_token_cross_attention": Field(("bool",), expect="true or false"),
        "scheduler": Field(("object",), True, expect="the scheduler config"),
        "feature_extractor": Field(("object",), True, expect="the feature extractor config"),
        "cutout_backdrop": _BACKDROP,
        "components": Field(("object",), True, expect="an object with one entry per component"),
    },
    "manifest_dims": {
        "model_size": Field(("int",), True, _int_in(8, 4096), "an integer in 8..4096"),
        "vae_scale_factor": Field(("int",), True, _int_in(1, 64), "an integer in 1..64"),
        "latent_channels": Field(("int",), True, _int_in(1, 64), "an integer in 1..64"),
        "unet_in_channels": Field(("int",), True, _int_in(1, 64), "an integer in 1..64"),
        "context_tokens": Field(("int",), True, _int_in(1, 4096), "an integer in 1..4096"),
        "context_dim": Field(("int",), True, _DIM, "an integer in 1..16384"),
        "clip_size": Field(("int",), False, _int_in(1, 4096), "an integer in 1..4096"),
        "feature_channels": Field(("int",), False, _int_in(0, 16384), "an integer in 0..16384"),
    },
    "manifest_component": {
        "file": Field(("str",), True, expect="a file name inside the export"),
        "sha256": Field(("str",), True, lambda v: len(v) == 64, "a 64-character sha256"),
        "external_data": Field(("list",), False, lambda v: all(map(_file_entry, v)),
                               "a list of {'file', 'sha256'} objects"),
        "openvino": Field(("object",), False, lambda v: _file_entry(v) and isinstance(v.get("external_data", []), list)
                          and all(map(_file_entry, v.get("external_data", []))),
                          "an object {'file', 'sha256', 'external_data': [{'file', 'sha256'}]} (an int8 OpenVINO IR)"),
    },
    "engines": {
        "onnx_manifest": Field(("object",), True, expect="the source export's manifest"),
        "engines": Field(("object",), True, lambda v: all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                         for e in v.values()),
                         "an object of component -> {'file': name}"),
    },
    "sidecar": {
        "format": Field(("str",), True, expect="'composekit-trt-engine'"),
        "component": Field(("str",), True, expect="a component name"),
        "engine_file": Field(("str",), True, expect="the engine's file name"),
        "engine_sha256": Field(("str",), True, lambda v: len(v) == 64, "a 64-character sha256"),
        "source_onnx": Field(("str",), True, expect="the ONNX file name"),
        "source_onnx_sha256": Field(("str",), True, expect="a sha256"),
        "tensorrt_version": Field(("str",), True, expect="a version string"),
        "gpu_name": Field(("str",), True, expect="a GPU name"),
        "compute_capability": Field(("str",), True, expect="e.g. '9.0'"),
        "build_flags": Field(("object",), expect="an object"),
        "profile": Field(("object",), expect="an object"),
    },
}
