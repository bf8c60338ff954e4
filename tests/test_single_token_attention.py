"""The single-token cross-attention shortcut: the same function as diffusers' attention, less work.

Reference: diffusers' own attention processor on the same module and weights (with one key the softmax is
exactly 1, so the two differ only by float rounding; the stated tolerance is float32's). Contexts of more
than one token, masks and 4-D inputs must reach diffusers' processor untouched (bit-identical).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from composekit.backends.single_token_attention import SingleTokenCrossAttention, apply


def _cross_attention(**kwargs):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(32, cross_attention_dim=24, heads=2, dim_head=16, **kwargs).eval()


@pytest.mark.parametrize("kwargs", [{}, {"residual_connection": True, "rescale_output_factor": 2.0},
                                    {"out_bias": False}])
@torch.no_grad()
def test_equals_diffusers_attention_for_one_token(kwargs):
    attn = _cross_attention(**kwargs)
    hidden, context = torch.randn(2, 64, 32), torch.randn(2, 1, 24) * 3
    reference = attn(hidden, encoder_hidden_states=context)  # diffusers' processor: scores, softmax, values
    fast = copy.deepcopy(attn)
    fast.set_processor(SingleTokenCrossAttention(fast.processor))
    got = fast(hidden, encoder_hidden_states=context)
    assert got.shape == reference.shape
    np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)
    if not kwargs.get("residual_connection"):  # with one key the output is the same row for every query
        assert (reference - reference[:, :1]).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["three tokens", "mask", "4-d input", "self-attention"])
@torch.no_grad()
def test_anything_else_goes_to_the_wrapped_processor_unchanged(case):
    attn = _cross_attention()
    hidden, context, mask = torch.randn(2, 64, 32), torch.randn(2, 1, 24), None
    if case == "three tokens":
        context = torch.randn(2, 3, 24)
    elif case == "mask":
        mask = torch.zeros(2, 1, 1)
    elif case == "4-d input":
        hidden = torch.randn(2, 32, 8, 8)
    else:
        attn = type(attn)(32, heads=2, dim_head=16).eval()  # no cross_attention_dim: a self-attention
        context = None
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return attn.processor(*args, **kwargs)

    reference = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    fast = copy.deepcopy(attn)
    fast.set_processor(SingleTokenCrossAttention(spy))
    got = fast(hidden, encoder_hidden_states=context, attention_mask=mask)
    assert len(calls) == 1
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


def _attn2_count(unet) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))


@torch.no_grad()
def test_unet_pass_equals_diffusers_and_objectstitch_is_untouched(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from composekit.apps.random_models import make_random_model

    for root, tokens in ((tiny_model_dir, 1), (make_random_model(tmp_path / "os", "tiny", family="objectstitch",
                                                                  adaptor="conv1d", seed=1), 77)):
        plain = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        fast = copy.deepcopy(plain)
        assert apply(fast) == _attn2_count(plain) > 0
        assert apply(fast) == 0  # installed once
        cfg = plain.config
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        context = torch.randn(2, tokens, cfg.cross_attention_dim, generator=g)
        t = torch.tensor([500, 500])
        want, got = plain(x, t, context).sample, fast(x, t, context).sample
        if tokens == 1:
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_backend_and_its_export_have_the_shortcut(tiny_model_dir, exported):
    onnx = pytest.importorskip("onnx")
    from composekit.backends.torch_backend import TorchBackend
    from composekit.formats.model_source import read_model_dir

    backend = TorchBackend(read_model_dir(tiny_model_dir), torch.device("cpu"), torch.float32)
    wrapped = [m for n, m in backend.unet_model.named_modules() if n.endswith(".attn2")]
    assert wrapped and all(isinstance(m.processor, SingleTokenCrossAttention) for m in wrapped)
    # the exported Paint-by-Example U-Net holds no cross-attention query projection (traced from those modules);
    # the ObjectStitch one (77 tokens) keeps every one
    counts = {}
    for family, (_, out) in exported.items():
        graph = onnx.load(str(out / "unet.onnx"), load_external_data=False).graph
        counts[family] = sum(1 for node in graph.node if "/attn2/to_q/" in node.name)
    assert counts == {"paint_by_example": 0, "objectstitch": _attn2_count(backend.unet_model)}


def test_export_manifest_says_whether_the_graphs_have_it(exported):
    from composekit.formats.export_manifest import read_manifest

    assert read_manifest(exported["paint_by_example"][1]).single_token_cross_attention is True
    assert read_manifest(exported["objectstitch"][1]).single_token_cross_attention is False  # 77 tokens


def test_int8_export_manifest_says_so_too(int8_export):
    from composekit.formats.export_manifest import read_manifest

    assert read_manifest(int8_export).single_token_cross_attention is True
