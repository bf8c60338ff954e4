"""Cross-attention to a single context token, computed without the attention (torch; exact).

Paint by Example conditions its U-Net on one token: the object's projected CLIP embedding. A
cross-attention with one key has one score per query, and the softmax of a single score is exactly 1,
so every query's output is that token's value vector, whatever the query:
``out = W_out (W_v c) + b_out``, the same row for all ``h x w`` queries. diffusers still computes the
query projection of every token, the scores, the softmax and the value product, and projects each of the
identical rows through ``to_out``: for a 512-pixel Stable Diffusion 1.x U-Net about 3% of a pass's
arithmetic, and 2-4.5% of its time on the CPU (measured interleaved: docs/benchmarks.md).

:class:`SingleTokenCrossAttention` wraps a cross-attention's own processor: with a one-token context and
no attention mask it projects the token once and broadcasts it to the queries; anything else (ObjectStitch's
257- or 77-token contexts, masks, 4-D inputs) goes to the wrapped processor unchanged. The result equals
the wrapped processor's up to float rounding (the broadcast row is the same product computed once).
:func:`apply` installs it on every U-Net cross-attention it is exact for; the torch backend does so when
it loads a U-Net, so the U-Net passes (full and shallow) and every graph traced from them have it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SingleTokenCrossAttention", "apply"]


class SingleTokenCrossAttention:
    """A diffusers attention processor: ``inner``'s cross-attention, skipped when the context has one token."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, **kwargs: Any) -> Any:
        if (encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[1] != 1
                or attention_mask is not None or hidden_states.ndim != 3):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        # softmax over one score is 1: each query's output is the token's value, projected out once
        value = attn.to_out[1](attn.to_out[0](attn.to_v(encoder_hidden_states)))  # (B, 1, C); to_out[1]: dropout
        out = value.expand(-1, hidden_states.shape[1], -1)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _exact_for(attn: Any) -> bool:
    """Whether the shortcut computes what ``attn``'s own processor would (no normalisation of its inputs or
    keys that the shortcut would skip, an output projection in diffusers' layout)."""
    if not getattr(attn, "is_cross_attention", False) or getattr(attn, "added_kv_proj_dim", None) is not None:
        return False
    if any(getattr(attn, name, None) is not None for name in ("group_norm", "spatial_norm", "norm_cross")):
        return False
    to_out = getattr(attn, "to_out", None)
    return to_out is not None and len(to_out) == 2 and hasattr(attn, "to_v")


def apply(unet: Any) -> int:
    """Install :class:`SingleTokenCrossAttention` on ``unet``'s cross-attentions (a diffusers
    ``UNet2DConditionModel``, or any module holding diffusers ``Attention`` modules); returns how many. Safe to
    call twice (an installed one is left as it is) and for models whose context has more tokens (the
    processor then defers to the wrapped one)."""
    from diffusers.models.attention_processor import Attention

    changed = 0
    for module in unet.modules():
        if isinstance(module, Attention) and _exact_for(module) and not isinstance(
                module.processor, SingleTokenCrossAttention):
            module.set_processor(SingleTokenCrossAttention(module.processor))
            changed += 1
    return changed
