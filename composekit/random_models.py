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

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["SIZES", "make_random_model", "component_configs"]

logger = logging.getLogger(__name__)

SIZES = ("tiny", "full")

_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


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
            "vae": dict(
                sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),
        }
    raise InputError(f"model size {size!r} is not known; expected one of {SIZES}")


def make_random_model(out_dir: str | os.PathLike, size: str = "tiny", *, seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Write a random Paint-by-Example model directory for ``size``, deterministic from ``seed``.

    The directory appears atomically: it is built beside ``out_dir`` and renamed into place, so a
    failure never leaves a half-written model that would load.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from .backends.torch_backend import image_encoder_class, quiet_loading

    configs = component_configs(size)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    with quiet_loading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision-fallback and deprecation notices, not actionable here
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline

        processor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    encoder = image_encoder_class()(CLIPVisionConfig(**configs["clip"])).eval()
    unet = UNet2DConditionModel(**configs["unet"]).eval()
    vae = AutoencoderKL(**configs["vae"]).eval()
    with torch.no_grad():
        # A trained SD VAE's posterior is very narrow (sampling it is the mean, to ~1e-4). A random
        # one's is not; pin its log-variance to -30 so sampled and mean latents agree like a real one's.
        latent = configs["vae"]["latent_channels"]
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -30.0
    pipe = PaintByExamplePipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=PNDMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=processor,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        with quiet_loading():
            pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "safety_checker", ignore_errors=True)
        # Record the classes under the names a Paint-by-Example index uses for them (pipeline-local
        # module for the encoder; the processor's public class, not transformers' PIL fallback).
        # composekit reads each folder's config itself and does not import what the index names.
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index["image_encoder"] = ["paint_by_example", "PaintByExampleImageEncoder"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(p.numel() for m in (encoder, unet, vae) for p in m.parameters())
    logger.info("wrote random %s model (%d parameters, seed %d) to %s", size, n, seed, out)
    return out
