"""Convert BCMI's public ``ObjectStitch.pth`` (latent-diffusion layout) into composekit's layout.

Input: the checkpoint (a pickled dict holding ``state_dict``; a ``.safetensors`` state dict is
accepted too) and the CLIP ViT-L/14 folder BCMI ships beside it (``config.json`` +
weights). Output: an ``ObjectStitchPipeline`` model directory (see ``composekit/formats/model_source.py``)
with a ``mapper`` content adaptor, loadable by ``Compositor.from_pretrained``.

Key mapping:

- ``model.diffusion_model.*`` -> ``unet/`` and ``first_stage_model.*`` -> ``vae/``, with diffusers'
  own converters for original SD checkpoints.
- ``cond_stage_model.transformer.*`` -> ``image_encoder/`` (a transformers ``CLIPVisionModel``); if
  the checkpoint has no CLIP weights, they come from the CLIP folder.
- ``cond_stage_model.mapper.resblocks.N.*`` -> ``adaptor/blocks.N.*`` (``attn.c_qkv`` split into
  ``to_q/to_k/to_v``, ``attn.c_proj`` -> ``to_out.0``, ``ln_1`` -> ``norm1``, ``ln_2`` -> ``norm3``,
  ``mlp.c_fc`` -> ``ff.net.0.proj``, ``mlp.c_proj`` -> ``ff.net.2``), ``cond_stage_model.final_ln`` ->
  ``final_layer_norm``, ``proj_out`` -> ``proj_out``, ``learnable_vector`` -> ``uncond_vector``.
- Reported, not converted: EMA copies (``model_ema.*``), the diffusion schedule's buffers (checked
  against the scheduler composekit writes), and any other key (listed as unmapped).

Pickle is read only here, with ``torch.load(weights_only=True)``; a file that needs more than that
is refused with the reason, never loaded unsafely.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from composekit.errors import InputError, ModelError, UnsafeModelFileError

__all__ = ["ConversionReport", "convert_objectstitch", "load_checkpoint", "map_mapper_keys"]

logger = logging.getLogger(__name__)

_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
    "mapper": "cond_stage_model.mapper.",
    "final_ln": "cond_stage_model.final_ln.",
    "proj_out": "proj_out.",
}
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
}
_MAPPER_NAMES = {
    "attn.c_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.c_proj": ("attn1.to_out.0",),
    "ln_1": ("norm1",),
    "ln_2": ("norm3",),
    "mlp.c_fc": ("ff.net.0.proj",),
    "mlp.c_proj": ("ff.net.2",),
}
_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading",
)


@dataclass
class ConversionReport:
    """What happened to every key of the checkpoint."""

    checkpoint: str
    mapped: dict[str, int] = field(default_factory=dict)  # component -> number of tensors
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    unmapped: list[str] = field(default_factory=list)  # keys composekit has no place for
    clip_weights_from: str = "checkpoint"
    schedule_check: str = "no schedule buffers in the checkpoint"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's flat state dict. Pickle only through ``torch.load(weights_only=True)``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise UnsafeModelFileError(
            f"{path} holds objects beyond tensors and plain containers, so torch.load(weights_only=True) "
            f"refused it ({str(exc).splitlines()[0]}). composekit never unpickles such files. If you trust the "
            "file, extract its weights yourself in a separate step, e.g. "
            "`python -c \"import torch, safetensors.torch as s; sd = torch.load('IN', weights_only=False)"
            "['state_dict']; s.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"`, "
            "and convert OUT.safetensors."
        ) from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} is not a state dict of tensors (nor a dict with a 'state_dict' of them)")
    return data


def map_mapper_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Original ``cond_stage_model.mapper/final_ln``, ``proj_out``, ``learnable_vector`` -> adaptor names."""
    out: dict[str, Any] = {}
    pattern = re.compile(r"^cond_stage_model\.mapper\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            block, name, kind = m.groups()
            if name not in _MAPPER_NAMES:
                raise ModelError(f"checkpoint key {key}: unknown mapper layer {name!r}")
            targets = _MAPPER_NAMES[name]
            chunk = value.shape[0] // len(targets)
            for i, target in enumerate(targets):
                out[f"blocks.{block}.{target}.{kind}"] = value[i * chunk : (i + 1) * chunk].clone()
        elif key.startswith(_PREFIXES["final_ln"]):
            out["final_layer_norm." + key[len(_PREFIXES["final_ln"]) :]] = value
        elif key.startswith(_PREFIXES["proj_out"]):
            out[key] = value
        elif key == "learnable_vector":
            out["uncond_vector"] = value
    return out


def _load_strict(module, state: dict[str, Any], what: str, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ModelError(f"{source}: the checkpoint lacks {len(missing)} {what} weight(s), e.g. {missing[:5]}")
    if unexpected:
        raise ModelError(f"{source}: {len(unexpected)} {what} weight(s) have no place, e.g. {unexpected[:5]}")


def _diffusers_convert(fn, state: dict[str, Any], config, what: str, source: str) -> dict[str, Any]:
    try:
        return fn(dict(state), dict(config))
    except KeyError as exc:
        raise ModelError(f"{source}: the checkpoint lacks the {what} weight {exc.args[0]!r}") from None


def _clip_config(clip_dir: Path):
    from transformers import CLIPVisionConfig

    cfg_path = clip_dir / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"CLIP folder {clip_dir} has no config.json; pass BCMI's openai-clip-vit-large-patch14 folder")
    data = json.loads(cfg_path.read_text())
    vision = data.get("vision_config", data) if data.get("model_type") == "clip" else data
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "architectures", "transformers_version")}
    return CLIPVisionConfig(**vision)


def _clip_state_from_folder(clip_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(clip_dir.glob("*.safetensors"))
    if files:
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(clip_dir.glob("*.bin"))
    if not bins:
        raise ModelError(f"CLIP folder {clip_dir} has no weights (.safetensors or .bin)")
    state = {}
    for f in bins:
        state.update(load_checkpoint(f))
    return state


def _clip_weights(model, state: dict[str, Any], source: str) -> None:
    """Load CLIP weights whatever their prefix (``vision_model.`` or none; full CLIPModel keys too)."""
    target = model.state_dict().keys()
    mapped: dict[str, Any] = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("vision_model."), "vision_model." + key):
            if candidate in target:
                mapped[candidate] = value
                break
    _load_strict(model, mapped, "CLIP", source)


def convert_objectstitch(
    checkpoint: str | os.PathLike,
    clip_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: str = "full",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert BCMI's ``ObjectStitch.pth`` + CLIP folder into an ObjectStitch model directory."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from composekit.apps.random_models import component_configs, model_index
    from composekit.core.adaptors import ContentAdaptor
    from composekit.core.scheduler import DDIMScheduler as Schedule
    from composekit.formats.model_writer import write_model_dir

    source = str(checkpoint)
    state = load_checkpoint(checkpoint)
    report = ConversionReport(checkpoint=source)

    # 1. Sort every key into a component, or a reported bucket.
    groups: dict[str, dict[str, Any]] = {k: {} for k in ("unet", "vae", "clip", "adaptor")}
    for key, value in state.items():
        if key.startswith(_PREFIXES["unet"]):
            groups["unet"][key] = value
        elif key.startswith(_PREFIXES["vae"]):
            groups["vae"][key] = value
        elif key.startswith(_PREFIXES["clip"]):
            groups["clip"][key[len(_PREFIXES["clip"]) :]] = value
        elif key.startswith((_PREFIXES["mapper"], _PREFIXES["final_ln"], _PREFIXES["proj_out"])) or key == "learnable_vector":
            groups["adaptor"][key] = value
        elif key.startswith("model_ema."):
            report.ignored.setdefault("EMA copy (the non-EMA weights are converted)", []).append(key)
        elif key in _SCHEDULE_BUFFERS:
            report.ignored.setdefault("diffusion schedule buffer (checked, not stored)", []).append(key)
        else:
            report.unmapped.append(key)
    for name in ("unet", "vae", "adaptor"):
        if not groups[name]:
            raise ModelError(f"{source}: no {name} weights (keys starting {_PREFIXES.get(name, 'cond_stage_model.mapper.')!r})")

    # 2. The schedule the checkpoint was trained with must be the one composekit's scheduler uses.
    if "alphas_cumprod" in state:
        ours = Schedule.from_config(_SCHEDULER).alphas_cumprod
        theirs = state["alphas_cumprod"].double().numpy()
        err = float(np.abs(theirs - ours).max()) if theirs.shape == ours.shape else float("inf")
        if err > 1e-5:
            raise ModelError(f"{source}: its alphas_cumprod differ from SD's schedule (max |diff| {err:.3g})")
        report.schedule_check = f"alphas_cumprod match SD's scaled_linear schedule (max |diff| {err:.2e})"

    configs = component_configs(size)
    # 3. U-Net and VAE through diffusers' converters for original SD checkpoints.
    in_channels = int(groups["unet"][_PREFIXES["unet"] + "input_blocks.0.0.weight"].shape[1])
    unet = UNet2DConditionModel(**dict(configs["unet"], in_channels=in_channels))
    _load_strict(unet, _diffusers_convert(convert_ldm_unet_checkpoint, groups["unet"], unet.config, "U-Net", source),
                 "U-Net", source)
    vae = AutoencoderKL(**configs["vae"])
    _load_strict(vae, _diffusers_convert(convert_ldm_vae_checkpoint, groups["vae"], vae.config, "VAE", source),
                 "VAE", source)

    # 4. CLIP vision tower: config from the CLIP folder, weights from the checkpoint (or the folder).
    clip_dir = Path(clip_dir)
    clip = CLIPVisionModel(_clip_config(clip_dir))
    clip_state = groups["clip"]
    if not clip_state:
        clip_state, report.clip_weights_from = _clip_state_from_folder(clip_dir), str(clip_dir)
    _clip_weights(clip, clip_state, source)

    # 5. The mapper adaptor.
    adaptor_state = map_mapper_keys(groups["adaptor"])
    blocks = len({k.split(".")[1] for k in adaptor_state if k.startswith("blocks.")})
    width = clip.config.hidden_size
    tokens = (clip.config.image_size // clip.config.patch_size) ** 2 + 1
    context_dim = int(adaptor_state["proj_out.weight"].shape[0]) if "proj_out.weight" in adaptor_state else 768
    adaptor = ContentAdaptor(kind="mapper", width=width, context_dim=context_dim, tokens_in=tokens,
                             num_blocks=blocks, num_heads=1)
    if "uncond_vector" in adaptor_state:
        adaptor_state["uncond_vector"] = adaptor_state["uncond_vector"].reshape(1, 1, context_dim)
    _load_strict(adaptor, adaptor_state, "adaptor", source)

    processor_cfg = clip_dir / "preprocessor_config.json"
    processor = (CLIPImageProcessor.from_pretrained(str(clip_dir)) if processor_cfg.is_file()
                 else CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))
    report.mapped = {"unet": len(groups["unet"]), "vae": len(groups["vae"]), "image_encoder": len(clip_state),
                     "adaptor": len(groups["adaptor"])}
    with torch.no_grad():
        components = {"image_encoder": clip, "adaptor": adaptor, "unet": unet, "vae": vae,
                      "scheduler": DDIMScheduler(**_SCHEDULER), "feature_extractor": processor}
        index = dict(model_index("objectstitch", "mapper"), scheduler=["diffusers", "DDIMScheduler"],
                     converted_from=Path(source).name)
        write_model_dir(out_dir, components, index, overwrite=overwrite,
                        extra_files={"conversion_report.json": json.dumps(asdict(report), indent=2) + "\n"})
    if report.unmapped:
        logger.warning("%d checkpoint key(s) were not converted: %s", len(report.unmapped), report.unmapped[:10])
    return report
