"""ObjectStitch's content adaptor: CLIP image tokens -> the U-Net's cross-attention context.

Input: CLIP ViT-L/14's full last hidden state after CLIP's own post layer norm, ``(B, 257, 1024)``.
Two kinds, picked by the config's ``kind``:

- ``"mapper"`` — BCMI's public ObjectStitch: ``num_blocks`` transformer blocks (1 head) over all 257
  tokens, a final layer norm and a ``1024 -> 768`` projection: context ``(B, 257, 768)``. The blocks
  are the same as Paint by Example's mapper (diffusers' ``BasicTransformerBlock``), so the original
  checkpoint's ``resblocks`` map onto them one to one.
- ``"conv1d"`` — the paper's design (ObjectStitch's content adaptor): a 1D convolution over the token axis
  ``257 -> 77``, ``num_blocks`` attention blocks, a layer norm and an MLP ``1024 -> 768``: context
  ``(B, 77, 768)``, shaped like SD's text tokens. No public weights exist for it.

Both hold the learned unconditional vector ``v`` ``(1, 1, 768)`` for classifier-free guidance,
repeated to the context's token count (as BCMI does). Needs torch and diffusers.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["ContentAdaptor", "KINDS"]

KINDS = ("mapper", "conv1d")


class ContentAdaptor(ModelMixin, ConfigMixin):
    """Image tokens ``(B, tokens_in, width)`` -> context ``(B, T, context_dim)``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        kind: str = "mapper",
        width: int = 1024,
        context_dim: int = 768,
        tokens_in: int = 257,
        tokens_out: int = 77,
        num_blocks: int = 5,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adaptor kind {kind!r} is not one of {KINDS}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.token_conv = nn.Conv1d(tokens_in, tokens_out, kernel_size=1) if kind == "conv1d" else None
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(width, num_heads, width // num_heads, activation_fn="gelu", attention_bias=True)
            for _ in range(num_blocks)
        )
        self.final_layer_norm = nn.LayerNorm(width)
        if kind == "mapper":
            self.proj_out = nn.Linear(width, context_dim)
        else:
            self.proj_out = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, context_dim))
        self.uncond_vector = nn.Parameter(torch.randn(1, 1, context_dim))

    @property
    def num_tokens(self) -> int:
        return self.config.tokens_out if self.config.kind == "conv1d" else self.config.tokens_in

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        if self.token_conv is not None:
            x = self.token_conv(x)  # the token axis is the channel axis: 257 -> 77
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.final_layer_norm(x))

    def unconditional(self, batch: int) -> torch.Tensor:
        """The learned unconditional context ``v``, repeated to ``(batch, T, context_dim)``."""
        return self.uncond_vector.expand(batch, self.num_tokens, -1)
