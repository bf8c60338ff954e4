"""Finding a model on disk or on the Hugging Face Hub, and checking its layout before any weight loads.

A model is a directory in diffusers' Paint-by-Example layout::

    model_index.json                 ("_class_name": "PaintByExamplePipeline" or "ObjectStitchPipeline")
    feature_extractor/preprocessor_config.json
    image_encoder/config.json + model.safetensors
    unet/config.json          + diffusion_pytorch_model.safetensors
    vae/config.json           + diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    adaptor/config.json       + diffusion_pytorch_model.safetensors   (ObjectStitch family only)

For ObjectStitch models ``image_encoder/`` is a plain transformers ``CLIPVisionModel`` and
``adaptor/`` is composekit's :class:`~composekit.core.adaptors.ContentAdaptor`.

Weights are read only from safetensors; a component that has only pickle files (``.bin``, ``.pt``,
``.ckpt``) is refused, since unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composekit.errors import ModelError, ModelNotFoundError, UnsafeModelFileError
from composekit.formats.safe_json import MAX_JSON_BYTES, SCHEMAS, inside, read_json, regular_file

__all__ = ["ModelFiles", "COMPONENTS", "resolve_source", "read_model_dir", "read_json", "HUB_ALLOW_PATTERNS",
           "check_safetensors"]

logger = logging.getLogger(__name__)

# component -> (config file, is it a weight-bearing component)
COMPONENTS: dict[str, tuple[str, bool]] = {
    "image_encoder": ("config.json", True),
    "unet": ("config.json", True),
    "vae": ("config.json", True),
    "scheduler": ("scheduler_config.json", False),
    "feature_extractor": ("preprocessor_config.json", False),
    "adaptor": ("config.json", True),
}
FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {
    "paint_by_example": ("image_encoder", "unet", "vae", "scheduler", "feature_extractor"),
    "objectstitch": ("image_encoder", "adaptor", "unet", "vae", "scheduler", "feature_extractor"),
}
FAMILIES = {"PaintByExamplePipeline": "paint_by_example", "ObjectStitchPipeline": "objectstitch"}
HUB_ALLOW_PATTERNS = ["model_index.json"] + [
    f"{name}/{pattern}"
    for name, (config, weighted) in COMPONENTS.items()
    for pattern in ([config, "*.safetensors", "*.safetensors.index.json"] if weighted else [config])
]
HUB_IGNORE_PATTERNS = ["*.fp16.*", "*non_ema*", "*.ema.*"]
# A tiny autoencoder repo (e.g. madebyollin/taesd) keeps one diffusers model at its root.
TINY_VAE_ALLOW_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelFiles:
    """A validated model directory: its family, every component's config, and weight file paths."""

    root: Path
    family: str
    index: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    weights: dict[str, tuple[Path, ...]]

    def component_dir(self, name: str) -> Path:
        return self.root / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def resolve_source(source: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False,
                   allow_patterns: list[str] | None = None) -> Path:
    """A local directory for ``source``: the directory itself, or a Hub snapshot (downloaded if needed).

    Only the files composekit uses are fetched (no safety checker, no pickle weights, no fp16
    variants). ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` restricts to the local cache.
    """
    path = Path(os.fspath(source)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model source {str(path)!r} is a file; expected a model directory")
        return path
    text = os.fspath(source)
    if not _looks_like_repo_id(text):
        raise ModelNotFoundError(
            f"model source {text!r} is neither an existing directory nor a Hub repo id like "
            "'Fantasy-Studio/Paint-by-Example'. Check the path, or build an offline model with "
            "`composekit make-model tiny DIR`."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # (huggingface_hub.errors only exists from 0.25 on)
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = local_files_only or _offline()
    logger.info("resolving %s from the Hugging Face Hub%s", text, " cache (offline)" if offline else "")
    try:
        snapshot = snapshot_download(
            text,
            revision=revision,
            allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            local_files_only=offline,
            library_name="composekit",
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as exc:
        raise ModelNotFoundError(
            f"Hub repo {text!r} (revision {revision or 'main'}) is not available: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}. Check the repo id and revision, and log in "
            "(`hf auth login`) for gated or private repos."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"model {text!r} is not in the local Hugging Face cache and downloading is "
            f"{'disabled (HF_HUB_OFFLINE / local_files_only)' if offline else 'not possible (no network?)'}. "
            "Download it once with network access, or pass a local model directory."
        ) from exc
    except OSError as exc:  # connection errors surface as OSError subclasses
        raise ModelNotFoundError(
            f"could not download {text!r} from the Hugging Face Hub: {exc}. Check the network, set "
            "HF_HUB_OFFLINE=1 to use the cache only, or pass a local model directory."
        ) from exc
    root = Path(snapshot)
    _explain_missing_safetensors(text, revision, root, offline)
    return root


def _explain_missing_safetensors(repo: str, revision: str | None, root: Path, offline: bool) -> None:
    """If a downloaded component has no safetensors, say whether the repo ships only pickle weights."""
    lacking = [name for name, (_, weighted) in COMPONENTS.items()
               if weighted and (root / name).is_dir() and not any((root / name).glob("*.safetensors"))]
    if not lacking or offline:
        return
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:  # the listing is only for a better message; read_model_dir still refuses the model
        logger.debug("could not list %s to explain missing safetensors", repo, exc_info=True)
        return
    pickles = sorted(f for f in files if f.split("/")[0] in lacking and f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeModelFileError(
            f"Hub repo {repo!r} (revision {revision or 'main'}) ships only pickle weights for {lacking} "
            f"({', '.join(pickles[:4])}); composekit loads safetensors only, because unpickling can run "
            "arbitrary code. Use a revision that has .safetensors files (e.g. a 'refs/pr/N' conversion PR), or "
            "convert the files yourself in a trusted environment and load the local directory."
        )


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file that is empty, truncated or whose header is malformed, before any
    library reads it (a download cut short looks like this). Reads only the header."""
    size = regular_file(path, "weight file").st_size
    hint = "the file is truncated or corrupt (an interrupted download?); re-download the model"
    if size < 8:
        raise ModelError(f"{path} is {size} bytes: {hint}")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_JSON_BYTES * 4):
            raise ModelError(f"{path}: its header claims {length:,} bytes but the file has {size:,}: {hint}")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelError(f"{path}: its header is not valid JSON: {hint}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: its header is not a JSON object: {hint}")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ModelError(f"{path}: tensor {name!r} lies outside the file's {data_size:,} data bytes: {hint}")


def _weights(root: Path, folder: Path) -> tuple[Path, ...]:
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name and p.is_file())
    for path in files:
        inside(root, path.relative_to(root), "weight file")
        check_safetensors(path)
    if files:
        return tuple(files)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeModelFileError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); composekit loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them once in a trusted environment "
            "(load with torch.load(weights_only=True), save with safetensors.torch.save_file) or use a "
            "revision of the model that ships .safetensors files."
        )
    raise ModelError(f"{folder} has no weight file; expected a .safetensors file there")


def read_model_dir(root: Path) -> ModelFiles:
    """Validate a model directory's layout and read its configs (no weights are loaded)."""
    root = Path(root)
    if not (root / "model_index.json").exists():
        raise ModelError(
            f"{root} has no model_index.json; expected a diffusers Paint-by-Example directory "
            "(model_index.json, image_encoder/, unet/, vae/, scheduler/, feature_extractor/)"
        )
    index = read_json(inside(root, "model_index.json"), schema=SCHEMAS["model_index"])
    cls = index["_class_name"]
    family = FAMILIES.get(cls)
    if family is None:
        raise ModelError(
            f"{root / 'model_index.json'} names pipeline {cls!r}; composekit supports {sorted(FAMILIES)}"
        )
    configs: dict[str, dict[str, Any]] = {}
    weights: dict[str, tuple[Path, ...]] = {}
    for name in FAMILY_COMPONENTS[family]:
        config_name, weighted = COMPONENTS[name]
        folder = root / name
        if not folder.is_dir():
            raise ModelError(
                f"model component {name!r} is missing: no folder {folder}. Re-download the model or "
                "rebuild it (`composekit make-model`)."
            )
        config_path = inside(root, f"{name}/{config_name}", "config")
        configs[name] = read_json(config_path, schema=SCHEMAS[name])
        if weighted:
            weights[name] = _weights(root, folder)
    _check_configs(root, family, configs)
    return ModelFiles(root=root, family=family, index=index, configs=configs, weights=weights)


def _check_configs(root: Path, family: str, configs: dict[str, dict[str, Any]]) -> None:
    """Cross-component consistency that would otherwise fail deep inside a forward pass."""
    unet, vae = configs["unet"], configs["vae"]
    latent = vae.get("latent_channels", 4)
    in_ch = unet.get("in_channels")
    if in_ch not in (latent, 2 * latent + 1):
        raise ModelError(
            f"{root / 'unet' / 'config.json'}: in_channels={in_ch}, expected {2 * latent + 1} "
            f"(noisy latent + masked-background latent + mask) or {latent} for the VAE's {latent} latent channels"
        )
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    if not 8 <= size <= 4096:
        raise ModelError(f"{root / 'unet' / 'config.json'}: sample_size={unet['sample_size']} with the VAE's "
                         f"{len(vae['block_out_channels'])} blocks gives {size}-pixel images; expected 8..4096. "
                         "The config is corrupt or from another model; re-download it")
    if unet.get("out_channels", latent) != latent:
        raise ModelError(f"{root / 'unet' / 'config.json'}: out_channels={unet.get('out_channels')} must equal the "
                         f"VAE's latent_channels={latent}; the components come from different models")
    if family == "objectstitch":
        producer, key, proj = "adaptor", "context_dim", configs["adaptor"].get("context_dim", 768)
        width = configs["image_encoder"].get("hidden_size")
        if configs["adaptor"].get("width", 1024) != width:
            raise ModelError(
                f"adaptor width={configs['adaptor'].get('width', 1024)} does not match the CLIP hidden_size="
                f"{width} in {root / 'image_encoder' / 'config.json'}; the components come from different models"
            )
    else:
        producer, key, proj = "image_encoder", "projection_dim", configs["image_encoder"].get("projection_dim", 768)
    cross = unet.get("cross_attention_dim")
    if cross != proj:
        raise ModelError(
            f"unet cross_attention_dim={cross} does not match {producer} {key}={proj}; "
            "the components come from different models"
        )
