"""The U-Net split at its shallowest skip branch, for feature caching (torch; diffusers' own modules).

A diffusers ``UNet2DConditionModel`` ends with its last up block, whose last layer (a resnet, then a
transformer in cross-attention blocks) takes ``cat([h, skip])``: ``h`` the deep features that every
block before it computed, ``skip`` the output of ``conv_in``. Between neighbouring steps ``h`` changes
little, so feature caching computes it in a full pass every few steps and otherwise runs only the
**shallow pass**: the time embedding, ``conv_in``, that last layer and ``conv_out``.

- :class:`FeatureTap` runs the full U-Net and also returns ``h`` (read by a forward pre-hook on that last
  resnet: the first ``C - skip`` channels of its input).
- :class:`ShallowUNet` is the shallow pass: the same modules, called in the order diffusers' forward
  calls them.

Given the ``h`` of the same step, the shallow pass equals the full pass (tested), so the only
approximation is using an earlier step's ``h``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from composekit.errors import ModelError

__all__ = ["FeatureTap", "ShallowUNet", "check_splittable", "feature_channels"]


def check_splittable(unet: Any) -> None:
    """Refuse U-Nets whose forward does more than the split reproduces (none of composekit's families do)."""
    cfg = unet.config
    extra = [name for name in ("class_embedding", "add_embedding", "encoder_hid_proj")
             if getattr(unet, name, None) is not None]
    last = unet.up_blocks[-1]
    if extra or getattr(last, "upsamplers", None) or getattr(cfg, "addition_embed_type", None):
        what = ", ".join(extra) or "an upsampler in its last up block"
        raise ModelError(f"this U-Net cannot be split for feature caching (it has {what}); use cache_interval=1")
    if getattr(last, "s1", None) is not None:
        raise ModelError("FreeU is enabled on this U-Net; feature caching does not support it (cache_interval=1)")


def feature_channels(unet: Any) -> int:
    """Channels of the cached features ``h`` (``block_out_channels[0]`` for Stable Diffusion's U-Net)."""
    return int(unet.up_blocks[-1].resnets[-1].in_channels) - int(unet.conv_in.out_channels)


class FeatureTap:
    """Captures ``h`` from inside a full pass: a forward pre-hook on the last up block's last resnet,
    active only for the thread inside :meth:`__call__` (a backend serves several threads at once)."""

    def __init__(self, unet: Any) -> None:
        check_splittable(unet)  # raises ModelError for a U-Net the split does not reproduce
        self.skip = int(unet.conv_in.out_channels)
        self._local = threading.local()
        unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(self._hook)

    def __deepcopy__(self, memo: dict) -> "FeatureTap":
        """A copy for a copied U-Net (the exporter's fp32 reference): its hook is copied with the module."""
        copy = FeatureTap.__new__(FeatureTap)
        copy.skip, copy._local = self.skip, threading.local()
        memo[id(self)] = copy
        return copy

    def _hook(self, module: Any, args: tuple) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is not None:
            hidden = args[0]  # cat([h, skip], dim=1)
            sink.append(hidden[:, : hidden.shape[1] - self.skip])

    def __call__(self, run: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``run(*args, **kwargs)`` (a U-Net pass) -> (its output, the features ``h`` it computed)."""
        self._local.sink = sink = []
        try:
            out = run(*args, **kwargs)
        finally:
            self._local.sink = None
        if len(sink) != 1:
            raise ModelError(f"the U-Net's last up layer ran {len(sink)} times in one pass; expected once")
        return out, sink[0]


class ShallowUNet(torch.nn.Module):
    """The ``unet_shallow`` spec: (sample, timestep, context, cached ``h``) -> noise prediction, for a U-Net that a
    :class:`FeatureTap` accepted."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        u = self.unet
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        # The time embedding, as the full forward computes it (no class or added embeddings: checked).
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if getattr(u, "time_embed_act", None) is not None:
            emb = u.time_embed_act(emb)
        # The skip branch: conv_in's output, which the last up layer concatenates after h.
        skip = u.conv_in(sample)
        block = u.up_blocks[-1]
        hidden = block.resnets[-1](torch.cat([features.to(skip.dtype), skip], dim=1), emb)
        attentions = getattr(block, "attentions", None)
        if attentions is not None:
            hidden = attentions[-1](hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if u.conv_norm_out is not None:
            hidden = u.conv_act(u.conv_norm_out(hidden))
        return u.conv_out(hidden)
