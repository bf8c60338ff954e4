"""Token downsampling: the U-Net's highest-resolution self-attentions attend to a subsampled grid (torch).

At the latent's full resolution (64 x 64 = 4096 tokens for a 512-pixel model) a self-attention compares
every token with every other: on CPUs it is a third of a full U-Net pass and half of the shallow pass of
feature caching (docs/benchmarks.md). Neighbouring latent cells carry similar features, so the keys and
values can come from every ``factor``-th cell in each direction (nearest-exact subsampling, the method's
default) while every query stays: ``factor`` 2 leaves a quarter of the keys and values, the output keeps
its shape, and nothing has to be merged back. It is a speed/quality trade like feature caching.

Only the self-attentions (``attn1``) of the first down block and the last up block run at that
resolution; the cross-attentions (to the object's few tokens) and deeper blocks are left alone.

:func:`apply` installs :class:`SubsampledSelfAttention` around each such attention's own processor,
which then computes the attention with the subsampled tokens as its "encoder" states: the same diffusers
code, so no second copy of attention. Both the U-Net passes (full and shallow) and the exported graphs
(traced from these modules) get it, and an export records its factor in its manifest.
"""

from __future__ import annotations

from typing import Any

from composekit.core.options import MAX_TOKEN_DOWNSAMPLING, check_integer
from composekit.errors import InputError, ModelError

__all__ = ["SubsampledSelfAttention", "apply"]


class SubsampledSelfAttention:
    """A diffusers attention processor: ``inner``'s self-attention with keys and values taken from every
    ``factor``-th token of an ``height x width`` token grid in each direction."""

    def __init__(self, inner: Any, height: int, width: int, factor: int) -> None:
        self.inner, self.height, self.width, self.factor = inner, height, width, factor
        self.offset = factor // 2  # nearest-exact: output cell i reads input cell floor((i + 0.5) * factor)

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, **kwargs: Any) -> Any:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, tokens, channels = hidden_states.shape
        if tokens != self.height * self.width:
            raise ModelError(f"token downsampling expected {self.height} x {self.width} = {self.height * self.width} "
                             f"tokens at the U-Net's highest resolution, got {tokens}; the latent's size differs "
                             "from the model's. Load the model without token_downsampling")
        grid = hidden_states.reshape(batch, self.height, self.width, channels)
        keys = grid[:, self.offset::self.factor, self.offset::self.factor].reshape(batch, -1, channels)
        return self.inner(attn, hidden_states, keys, None, temb, **kwargs)


def _full_resolution_attentions(unet: Any) -> list[Any]:
    """The self-attention modules of the first down block and the last up block (the full-resolution ones)."""
    found = []
    for block in (unet.down_blocks[0], unet.up_blocks[-1]):
        for transformer in getattr(block, "attentions", None) or ():
            for layer in getattr(transformer, "transformer_blocks", ()):
                attn = getattr(layer, "attn1", None)
                if attn is not None and not getattr(layer, "only_cross_attention", False):
                    found.append(attn)
    return found


def apply(unet: Any, factor: int) -> int:
    """Install token downsampling by ``factor`` (1 = off: nothing changes) on ``unet``, a diffusers
    ``UNet2DConditionModel``; returns how many self-attentions it changed. Raises InputError for a factor
    the latent's side is not a multiple of and ModelError for a U-Net it does not fit."""
    factor = check_integer("token_downsampling", factor, 1, MAX_TOKEN_DOWNSAMPLING)
    if factor == 1:
        return 0
    side = unet.config.sample_size
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    if height % factor or width % factor:
        fitting = [str(f) for f in range(2, MAX_TOKEN_DOWNSAMPLING + 1) if not height % f and not width % f]
        raise InputError(f"token_downsampling={factor} does not divide the model's {height} x {width} latent; use "
                         f"{', '.join(fitting)}")
    attentions = _full_resolution_attentions(unet)
    if not attentions:
        raise ModelError("this U-Net has no self-attention at its highest resolution, so token downsampling would "
                         "change nothing; load it without token_downsampling")
    for attn in attentions:
        if isinstance(attn.processor, SubsampledSelfAttention):
            raise ModelError("token downsampling is already installed on this U-Net")
        unusual = [name for name in ("group_norm", "spatial_norm") if getattr(attn, name, None) is not None]
        if unusual or getattr(attn, "norm_cross", None):
            raise ModelError(f"this U-Net's self-attention normalizes its inputs ({', '.join(unusual) or 'norm_cross'})"
                             ", which token downsampling does not reproduce; load it without token_downsampling")
    for attn in attentions:
        attn.set_processor(SubsampledSelfAttention(attn.processor, height, width, factor))
    return len(attentions)
