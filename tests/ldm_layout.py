"""Test helper: write diffusers-layout U-Net/VAE weights under the original latent-diffusion key names.

Used to build synthetic checkpoints "with the layout of the public file" at tiny sizes. It is the
inverse of diffusers' converters for original SD checkpoints, written out from the structure of the
LDM ``UNetModel`` (input/middle/output blocks) and ``Encoder``/``Decoder`` (down/mid/up). If a name
here were wrong, diffusers' forward converter or the strict load after it would fail the test.
"""

from __future__ import annotations

from typing import Any

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _swap(name: str, pairs) -> str:
    for new, old in pairs:
        name = name.replace(new, old)
    return name


def unet_to_ldm(state: dict[str, Any], config) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` keys."""
    n = len(config["block_out_channels"])
    per = config["layers_per_block"] + 1  # LDM input blocks per level: L resnets + 1 downsample
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                ("mid_block.resnets.1.", "middle_block.2.")]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    for i in range(n):
        for j in range(config["layers_per_block"]):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op."))
        for j in range(per):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1."))
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{2 if up_has_attn[i] else 1}."))
    out = {}
    for key, value in state.items():
        prefix, old = next((p, o) for p, o in prefixes if key.startswith(p))
        suffix = key[len(prefix):]
        if "resnets" in prefix:
            suffix = _swap(suffix, _RESNET)
        out["model.diffusion_model." + old + suffix] = value
    return out


def vae_to_ldm(state: dict[str, Any], config) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    n = len(config["block_out_channels"])
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = {}
    for key, value in state.items():
        new = next((old + key[len(p):] for p, old in prefixes if key.startswith(p)), key)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            new = _swap(new, _VAE_ATTN)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out
