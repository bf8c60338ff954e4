"""The ``manifest.json`` of an exported model: everything the exported-model runtimes need.

An export directory holds one ONNX graph per component (``object_encoder.onnx``, ``unet.onnx``,
``vae_encoder.onnx``, ``vae_decoder.onnx``, with ``*.onnx.data`` external data for graphs over 2 GB)
(and, in an ``--int8`` export, an OpenVINO IR beside each U-Net graph: ``unet.int8.xml`` and ``.bin``)
and this manifest: composekit version, source model and family, model dimensions, precision,
opset, the scheduler and feature-extractor configs, and per component its files with sha256 and
size, input/output names, shapes and dtypes, and the error measured against PyTorch at export.

Reading a manifest verifies every listed file's sha256 and that no file lies outside the
directory, so a tampered or half-copied export is refused before any graph is parsed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composekit.core.specs import (
    COMPONENT_NAMES,
    OPTIONAL_COMPONENTS,
    ComponentSpec,
    ModelDims,
    component_specs,
)
from composekit.errors import ModelError
from composekit.formats.safe_json import SCHEMAS, check, inside, read_json, regular_file

__all__ = ["MANIFEST", "FORMAT", "ExportManifest", "load_order", "read_manifest", "sha256_file"]

MANIFEST = "manifest.json"
FORMAT = "composekit-onnx"
FORMAT_VERSION = 1
LEGACY_MAX_BATCH = 2  # exports written before "max_batch" was recorded: U-Net batch 1..4


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, name: str) -> Path:
    """``root / name`` inside the export directory (see :func:`composekit.formats.safe_json.inside`)."""
    return inside(root, name, "file", "export directory")


@dataclass(frozen=True)
class ExportManifest:
    root: Path
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.data["source"]["family"])

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.data["dims"])

    @property
    def max_batch(self) -> int:
        """Most composites per batch the export was made for (exports before the field: 2)."""
        return int(self.data.get("max_batch", LEGACY_MAX_BATCH))

    def specs(self) -> dict[str, ComponentSpec]:
        """The component specs the graphs were exported with (what the runtimes bind and check against)."""
        return component_specs(self.dims, dynamic_spatial=bool(self.data.get("dynamic_spatial")),
                               max_batch=self.max_batch)

    @property
    def optimized(self) -> str | None:
        """ONNX Runtime fusions applied at export: None, ``"cpu"`` or ``"cuda"`` (contrib operators)."""
        return self.data.get("optimized")

    @property
    def int8(self) -> dict[str, Any]:
        """The components quantized to int8 at export (``--int8``), each with how; empty for a float export."""
        return dict(self.data.get("int8") or {})

    @property
    def token_downsampling(self) -> int:
        """The token downsampling factor traced into the U-Net graphs (``--token-downsampling``; 1 = none)."""
        return int(self.data.get("token_downsampling") or 1)

    @property
    def single_token_cross_attention(self) -> bool:
        """Whether the U-Net graphs compute cross-attention to their one-token context as a broadcast (exact;
        exports made before composekit traced it that way, and multi-token families, say false)."""
        return bool(self.data.get("single_token_cross_attention"))

    @property
    def precision(self) -> str:
        return str(self.data["precision"])

    @property
    def scheduler(self) -> dict[str, Any]:
        return dict(self.data["scheduler"])

    @property
    def feature_extractor(self) -> dict[str, Any]:
        return dict(self.data["feature_extractor"])

    @property
    def cutout_backdrop(self) -> list[int]:
        return list(self.data.get("cutout_backdrop", [255, 255, 255]))

    def has(self, name: str) -> bool:
        """Whether the export holds component ``name`` (the optional ones may be absent)."""
        return name in self.data["components"]

    def component(self, name: str) -> dict[str, Any]:
        return dict(self.data["components"][name])

    def path(self, name: str) -> Path:
        return _inside(self.root, self.data["components"][name]["file"])

    def openvino_path(self, name: str) -> Path | None:
        """The ``.xml`` of the OpenVINO IR exported beside component ``name``'s ONNX graph (``--int8``), if any."""
        ir = self.data["components"][name].get("openvino")
        return None if ir is None else _inside(self.root, ir["file"])

    def openvino_weights(self, name: str) -> Path | None:
        """The ``.bin`` weights of component ``name``'s OpenVINO IR, if it has any (None: no IR or no weights)."""
        ir = self.data["components"][name].get("openvino")
        files = (ir or {}).get("external_data") or []
        return _inside(self.root, files[0]["file"]) if files else None


def load_order(manifest: ExportManifest, decoders: tuple[str, ...]) -> tuple[str, ...]:
    """The components a runtime opens from an export, in order: the object encoder and U-Net, the shallow U-Net
    (feature caching) when the export has it, the VAE encoder, then ``decoders`` (the one that decodes last)."""
    shallow = ("unet_shallow",) if manifest.has("unet_shallow") else ()
    return (*COMPONENT_NAMES[:-1], *shallow, *decoders)


def _present(data: dict[str, Any]) -> list[str]:
    """The components a manifest holds: the four, and the optional ones it lists."""
    return list(COMPONENT_NAMES) + [c for c in OPTIONAL_COMPONENTS if c in data["components"]]


def check_manifest_data(data: dict[str, Any], where: str, fix: str) -> None:
    """Check a manifest's content against its schema (also used for the copy an engine directory holds)."""
    if data.get("format") != FORMAT:
        raise ModelError(f"{where} is not a {FORMAT} manifest; {fix}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{where} has format_version {data.get('format_version')!r}; this composekit reads "
            f"{FORMAT_VERSION}. Re-export the model with this composekit version."
        )
    check(data, SCHEMAS["manifest"], where, fix)
    check(data["dims"], SCHEMAS["manifest_dims"], f"{where} (dims)", fix)
    if data["dims"]["model_size"] % data["dims"]["vae_scale_factor"]:
        raise ModelError(f"{where}: model_size {data['dims']['model_size']} is not a multiple of vae_scale_factor "
                         f"{data['dims']['vae_scale_factor']}; {fix}")
    missing = [c for c in COMPONENT_NAMES if c not in data["components"]]
    if missing:
        raise ModelError(f"{where} lacks component(s) {missing}; {fix}")
    caching, shallow = bool(data["dims"].get("feature_channels")), "unet_shallow" in data["components"]
    if caching != shallow:
        raise ModelError(f"{where}: dims.feature_channels is {data['dims'].get('feature_channels', 0)} but the "
                         f"unet_shallow graph is {'present' if shallow else 'absent'}; they go together. {fix}")
    for name in _present(data):
        entry = data["components"][name]
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: component {name!r} must be an object; {fix}")
        check(entry, SCHEMAS["manifest_component"], f"{where} ({name})", fix)


def read_manifest(root: str | os.PathLike, verify: bool = True) -> ExportManifest:
    """Parse and check ``root/manifest.json``; with ``verify`` also check every file's sha256."""
    root = Path(root)
    fix = "re-export the model"
    where = str(root / MANIFEST)
    data = read_json(root / MANIFEST, fix=fix,
                     missing=f"{root} has no {MANIFEST}; it is not a composekit export (run `composekit-export onnx`)")
    check_manifest_data(data, where, fix)
    for name in _present(data):
        entry = data["components"][name]
        ir = [entry["openvino"], *entry["openvino"].get("external_data", [])] if "openvino" in entry else []
        for item in [entry, *entry.get("external_data", []), *ir]:
            path = _inside(root, item["file"])
            try:
                regular_file(path, "exported graph file")
            except FileNotFoundError:
                raise ModelError(f"{path} is missing; the export is incomplete. Re-export or copy it again.") from None
            if verify and sha256_file(path) != item["sha256"]:
                raise ModelError(
                    f"{path} does not match the sha256 in {root / MANIFEST}: the file was modified or copied "
                    "incompletely. Re-export the model."
                )
    return ExportManifest(root, data)
