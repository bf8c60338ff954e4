"""Randomly initialised models in exactly the on-disk layout of real ones.

The workplace cannot reach a model hub, and latency does not depend on weight values, so tests and
benchmarks run on models built here: diffusers' and transformers' own classes, initialised from a
seed, saved with diffusers' ``save_pretrained`` (safetensors). Loading them goes through the same
code path as a downloaded model.

Sizes:

- ``tiny``: a few hundred thousand parameters, 64x64 images (8x8 latents), seconds on a CPU.
- ``full``: the real dimensions: CLIP ViT-L/14 vision tower (+ 5-block mapper), the SD 1.x U-Net with
  9 input channels (~860M parameters), the SD VAE; 512x512 images.

Needs the ``torch`` extra (torch, diffusers, transformers).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from composekit.errors import BackendUnavailableError, InputError, install_hint

__all__ = ["SIZES", "FAMILIES", "make_random_model", "make_random_tiny_vae", "component_configs", "model_index"]

logger = logging.getLogger(__name__)

SIZES = ("tiny", "full")
FAMILIES = ("paint_by_example", "objectstitch")

def _scheduler_config() -> dict:
    """SD 1.x's schedule (composekit's DDIMScheduler defaults), as the PNDM config Paint by Example ships."""
    from composekit.core.scheduler import DDIMScheduler

    sd = DDIMScheduler()
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "set_alpha_to_one", "steps_offset")
    return {**{k: getattr(sd, k) for k in keys}, "skip_prk_steps": True}


def component_configs(size: str) -> dict[str, dict[str, Any]]:
    """Constructor arguments of the CLIP vision config, U-Net and VAE for ``size``."""
    if size == "tiny":
        return {
            "clip": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                image_size=224, patch_size=14, projection_dim=32,
            ),
            "unet": dict(
                sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
            ),
            "adaptor": dict(width=32, context_dim=32, tokens_in=257, tokens_out=77, num_blocks=1, num_heads=1),
            "vae": dict(
                sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),
        }
    if size == "full":
        return {
            "clip": dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
            ),
            "unet": dict(
                sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8,
            ),
            "adaptor": dict(width=1024, context_dim=768, tokens_in=257, tokens_out=77, num_blocks=5, num_heads=1),
            "vae": dict(
                sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),
        }
    raise InputError(f"model size {size!r} is not known; expected one of {SIZES}")


def make_random_model(
    out_dir: str | os.PathLike,
    size: str = "tiny",
    *,
    family: str = "paint_by_example",
    adaptor: str = "mapper",
    unet_channels: int = 9,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random model directory of ``family`` and ``size``, deterministic from ``seed``.

    ``family="objectstitch"`` adds a content adaptor of kind ``adaptor`` (``"mapper"`` or
    ``"conv1d"``) after a plain CLIP vision tower; ``unet_channels=4`` gives a plain SD U-Net (the
    4-channel masked-DDIM path) instead of the 9-channel inpainting one. The directory appears
    atomically (see :mod:`composekit.formats.model_writer`).
    """
    try:
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError as exc:
        raise BackendUnavailableError(
            f"building random models needs PyTorch, diffusers and transformers ({exc.name} is missing): "
            f"{install_hint('torch')}"
        ) from exc

    from composekit.backends.torch_backend import image_encoder_class, quiet_loading
    from composekit.core.adaptors import KINDS, ContentAdaptor
    from composekit.formats.model_writer import write_model_dir

    if family not in FAMILIES:
        raise InputError(f"model family {family!r} is not known; expected one of {FAMILIES}")
    if family == "objectstitch" and adaptor not in KINDS:
        raise InputError(f"adaptor kind {adaptor!r} is not known; expected one of {KINDS}")
    if unet_channels not in (4, 9):
        raise InputError(f"unet_channels must be 9 (inpainting U-Net) or 4 (plain SD U-Net), got {unet_channels!r}")
    configs = component_configs(size)
    if Path(out_dir).exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another directory or pass overwrite=True")

    torch.manual_seed(seed)
    with quiet_loading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' torchvision-fallback notice, not actionable here
        # Imported here, under quiet_loading: transformers warns at import that torchvision is absent
        # (it then uses its PIL processor, which is all composekit needs).
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    clip_config = CLIPVisionConfig(**configs["clip"])
    components: dict[str, Any] = {}
    if family == "objectstitch":
        components["image_encoder"] = CLIPVisionModel(clip_config).eval()
        components["adaptor"] = ContentAdaptor(kind=adaptor, **configs["adaptor"]).eval()
    else:
        components["image_encoder"] = image_encoder_class()(clip_config).eval()
    components["unet"] = UNet2DConditionModel(**dict(configs["unet"], in_channels=unet_channels)).eval()
    vae = AutoencoderKL(**configs["vae"]).eval()
    with torch.no_grad():
        # A trained SD VAE's posterior is very narrow (sampling it is the mean, to ~1e-4). A random
        # one's is not; pin its log-variance to -30 so sampled and mean latents agree like a real one's.
        latent = configs["vae"]["latent_channels"]
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -30.0
    components.update(vae=vae, scheduler=PNDMScheduler(**_scheduler_config()), feature_extractor=processor)
    out = write_model_dir(out_dir, components, model_index(family, adaptor if family == "objectstitch" else None),
                          overwrite=overwrite)
    n = sum(p.numel() for m in components.values() if hasattr(m, "parameters") for p in m.parameters())
    logger.info("wrote random %s %s model (%d parameters, seed %d) to %s", size, family, n, seed, out)
    return out


# AutoencoderTiny configurations: "full" is TAESD's published architecture (madebyollin/taesd: 64 channels,
# 1/3/3/3 encoder and 3/3/3/1 decoder blocks, ~2.4M parameters), "tiny" a narrow one for tests. Both
# upsample by 8 and have 4 latent channels, like SD 1.x's VAE.
TINY_VAE_CONFIGS = {
    "full": dict(encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
                 num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)),
    "tiny": dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)),
}


def make_random_tiny_vae(out_dir: str | os.PathLike, size: str = "tiny", *, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Write a random diffusers ``AutoencoderTiny`` directory (TAESD's layout: ``config.json`` and
    ``diffusion_pytorch_model.safetensors``), deterministic from ``seed``, atomically."""
    try:
        import torch
        from diffusers import AutoencoderTiny
    except ImportError as exc:
        raise BackendUnavailableError(f"building a random tiny VAE needs PyTorch and diffusers: "
                                      f"{install_hint('torch')}") from exc
    from composekit.formats.atomic import atomic_directory

    if size not in TINY_VAE_CONFIGS:
        raise InputError(f"size must be one of {sorted(TINY_VAE_CONFIGS)}, got {size!r}")
    if Path(out_dir).exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another directory or pass overwrite=True")
    torch.manual_seed(seed)
    vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=4, upsampling_scaling_factor=2,
                          **TINY_VAE_CONFIGS[size]).eval()
    with atomic_directory(out_dir, overwrite) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    logger.info("wrote random %s AutoencoderTiny (%d parameters, seed %d) to %s", size,
                sum(p.numel() for p in vae.parameters()), seed, out_dir)
    return Path(out_dir)


def model_index(family: str, adaptor: str | None = None) -> dict[str, Any]:
    """``model_index.json`` for a family, naming classes as a diffusers index does.

    composekit reads each component's own config and does not import what the index names.
    """
    from diffusers import __version__ as diffusers_version

    from composekit import __version__

    common = {
        "_diffusers_version": diffusers_version,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family == "objectstitch":
        return dict(common, _class_name="ObjectStitchPipeline", _composekit_version=__version__,
                    image_encoder=["transformers", "CLIPVisionModel"], adaptor=["composekit", "ContentAdaptor"],
                    adaptor_kind=adaptor, cutout_backdrop=[0, 0, 0])
    return dict(common, _class_name="PaintByExamplePipeline", requires_safety_checker=False,
                safety_checker=[None, None], image_encoder=["paint_by_example", "PaintByExampleImageEncoder"])
