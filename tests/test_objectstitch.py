"""ObjectStitch models: content adaptors, BCMI checkpoint conversion, the 4-channel masked-DDIM path."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import gradient_background, noise_object
from ldm_layout import unet_to_ldm, vae_to_ldm

from composekit import Compositor, ModelError
from composekit.apps.random_models import component_configs, make_random_model
from composekit.errors import UnsafeModelFileError

FAST = dict(steps=3, guidance=3.0, progress=False)


@pytest.fixture(scope="module")
def os_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectstitch")
    return {
        "mapper": make_random_model(root / "mapper", "tiny", family="objectstitch", adaptor="mapper", seed=1),
        "conv1d": make_random_model(root / "conv1d", "tiny", family="objectstitch", adaptor="conv1d", seed=2),
        "plain4": make_random_model(root / "plain4", "tiny", family="objectstitch", adaptor="mapper",
                                    unet_channels=4, seed=3),
    }


def test_full_size_shapes():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from composekit.core.adaptors import ContentAdaptor

    cfg = component_configs("full")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**cfg["clip"])).eval()
    with torch.no_grad():
        tokens = clip(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
        assert tuple(tokens.shape) == (1, 257, 1024)
        for kind, expected in (("mapper", (1, 257, 768)), ("conv1d", (1, 77, 768))):
            adaptor = ContentAdaptor(kind=kind, **cfg["adaptor"]).eval()
            assert tuple(adaptor(tokens).shape) == expected
            assert tuple(adaptor.unconditional(1).shape) == expected


def test_adaptor_param_command_matches_docs():
    out = subprocess.run([sys.executable, "-m", "composekit_export", "adaptor-params"], capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    assert rows["mapper"]["context"] == [257, 768] and rows["conv1d"]["context"] == [77, 768]
    assert rows["mapper"]["parameters"] == 63_771_136 and rows["conv1d"]["parameters"] == 64_840_602


@pytest.mark.parametrize("name,tokens", [("mapper", 257), ("conv1d", 77)])
def test_objectstitch_models_composite(os_models, name, tokens):
    comp = Compositor.from_pretrained(os_models[name], device="cpu")
    assert comp.backend.info.family == "objectstitch" and comp.backdrop == (0, 0, 0)
    cond, uncond = comp.backend.encode_object(comp.preprocessor(np.asarray(noise_object())))
    assert tuple(cond.shape) == tuple(uncond.shape) == (1, tokens, 32)
    bg = gradient_background(150, 90)
    r = comp.paste(noise_object(), bg, (30, 10, 110, 80), seed=0, **FAST)
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])
    assert (np.asarray(r.image)[r.mask] != np.asarray(bg)[r.mask]).any()


def test_four_channel_path_keeps_the_noised_background_outside_the_mask(os_models):
    comp = Compositor.from_pretrained(os_models["plain4"], device="cpu")
    assert comp.backend.info.unet_in_channels == 4
    size = comp.backend.info.model_size
    bg = gradient_background(size, size)  # the model's size: no crop, no resize
    box, seed, steps = (16, 8, 48, 40), 5, 4
    seen = []
    r = comp.paste(noise_object(), bg, box, seed=seed, steps=steps, guidance=3.0, progress=False,
                   callback=lambda i, t, x: seen.append((t, x)))
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])

    # Independently: z_bg = E(window), and the per-step noise the sampler draws from the seed
    # (x_T first, then one draw per step), noised with the forward process q(z_bg, t_prev).
    image = np.asarray(bg, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    z_bg = comp.backend.to_numpy(comp.backend.encode_image(comp.backend.asarray(image)))
    rng = np.random.default_rng(seed)
    shape = z_bg.shape
    rng.standard_normal(shape, dtype=np.float32)  # x_T
    outside = np.ones(shape[2:], bool)
    outside[1:5, 2:6] = False  # the box (16..48, 8..40) in 8-pixel latent cells
    for t, latents in seen:
        noise = rng.standard_normal(shape, dtype=np.float32)
        t_prev = comp.scheduler.coefficients(t, steps).t_prev
        expected = comp.scheduler.add_noise(z_bg, noise, t_prev) if t_prev >= 0 else z_bg
        np.testing.assert_allclose(latents[..., outside], expected[..., outside], atol=1e-5)
        assert np.abs(latents[..., ~outside] - expected[..., ~outside]).max() > 1e-3  # inside: generated


@pytest.mark.parametrize("name", ["mapper", "plain4"])
def test_fidelity_on_objectstitch_models(os_models, name):
    # fidelity=0 is the plain sampler bit for bit (9- and 4-channel U-Nets); with fidelity on, the
    # 4-channel path still holds the noised background outside the hole and the result's background.
    comp = Compositor.from_pretrained(os_models[name], device="cpu")
    bg, obj, box = gradient_background(120, 90), noise_object(), (20, 10, 90, 80)
    plain = comp.paste(obj, bg, box, seed=4, **FAST)
    zero = comp.paste(obj, bg, box, seed=4, fidelity=0.0, **FAST)
    np.testing.assert_array_equal(np.asarray(plain.image), np.asarray(zero.image))
    on = comp.paste(obj, bg, box, seed=4, fidelity=0.8, **FAST)
    np.testing.assert_array_equal(np.asarray(on.image)[~on.mask], np.asarray(bg)[~on.mask])
    assert not np.array_equal(np.asarray(on.image), np.asarray(plain.image))


# --- BCMI checkpoint conversion ----------------------------------------------------------------


def _xf_reference(state, tokens, blocks):
    """A direct re-implementation of BCMI's mapper forward (GLIDE's xf.Transformer, 1 head), the
    final layer norm and proj_out, on the original checkpoint's weights."""
    import torch.nn.functional as F

    x = tokens
    width = x.shape[-1]
    for i in range(blocks):
        p = f"cond_stage_model.mapper.resblocks.{i}."
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        qkv = h @ state[p + "attn.c_qkv.weight"].T + state[p + "attn.c_qkv.bias"]
        q, k, v = qkv.split(width, dim=-1)
        scale = 1 / math.sqrt(math.sqrt(width))
        w = torch.softmax((q * scale) @ (k * scale).transpose(1, 2), dim=-1)
        x = x + (w @ v) @ state[p + "attn.c_proj.weight"].T + state[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(h @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"])
        x = x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (width,), state["cond_stage_model.final_ln.weight"], state["cond_stage_model.final_ln.bias"])
    return x @ state["proj_out.weight"].T + state["proj_out.bias"]


@pytest.fixture(scope="module")
def bcmi_checkpoint(tmp_path_factory):
    """A synthetic ObjectStitch.pth: original key names, tiny shapes, plus the CLIP folder beside it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("bcmi")
    cfg = component_configs("tiny")
    torch.manual_seed(7)
    unet, vae = UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"])
    clip = CLIPVisionModel(CLIPVisionConfig(**cfg["clip"]))
    clip.save_pretrained(root / "openai-clip-vit-large-patch14", safe_serialization=True)
    width, ctx, blocks = cfg["clip"]["hidden_size"], cfg["unet"]["cross_attention_dim"], 2
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update({"cond_stage_model.transformer.vision_model." + k.removeprefix("vision_model."): v
                  for k, v in clip.state_dict().items()})
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "attn.c_qkv.weight": (3 * width, width), "attn.c_qkv.bias": (3 * width,),
              "attn.c_proj.weight": (width, width), "attn.c_proj.bias": (width,),
              "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
              "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    for i in range(blocks):
        for name, shape in shapes.items():
            state[f"cond_stage_model.mapper.resblocks.{i}.{name}"] = torch.randn(shape) * 0.2
    state["cond_stage_model.final_ln.weight"] = 1 + 0.1 * torch.randn(width)
    state["cond_stage_model.final_ln.bias"] = 0.1 * torch.randn(width)
    state["proj_out.weight"], state["proj_out.bias"] = 0.2 * torch.randn(ctx, width), 0.1 * torch.randn(ctx)
    state["learnable_vector"] = torch.randn(1, 1, ctx)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    state["betas"], state["alphas_cumprod"] = sched.betas.clone(), sched.alphas_cumprod.clone()
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.num_updates"] = torch.tensor(10)
    state["cond_stage_model.extra_head.weight"] = torch.zeros(3)  # a key composekit has no place for
    path = root / "ObjectStitch.pth"
    torch.save({"state_dict": state, "epoch": 12, "global_step": 3456}, path)
    return {"path": path, "clip": root / "openai-clip-vit-large-patch14", "state": state, "blocks": blocks,
            "unet": unet, "root": root}


def test_converter_output_loads_composites_and_matches_the_original(bcmi_checkpoint, tmp_path):
    from composekit_export.convert_objectstitch import convert_objectstitch

    out = tmp_path / "converted"
    report = convert_objectstitch(bcmi_checkpoint["path"], bcmi_checkpoint["clip"], out, size="tiny")
    assert report.unmapped == ["cond_stage_model.extra_head.weight"]
    ignored = {k for keys in report.ignored.values() for k in keys}
    assert {"model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod"} <= ignored
    assert "match" in report.schedule_check
    assert json.loads((out / "conversion_report.json").read_text())["unmapped"] == report.unmapped

    comp = Compositor.from_pretrained(out, device="cpu")
    assert comp.backend.info.family == "objectstitch"
    # U-Net weights survive the round trip exactly.
    original = bcmi_checkpoint["unet"].state_dict()
    converted = comp.backend.unet_model.state_dict()
    assert all(torch.equal(original[k], converted[k]) for k in original)
    # The converted mapper equals a direct re-implementation of the original forward.
    tokens = torch.randn(2, 257, 32)
    with torch.no_grad():
        ours = comp.backend.adaptor(tokens)
        ref = _xf_reference(bcmi_checkpoint["state"], tokens, bcmi_checkpoint["blocks"])
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(comp.backend.adaptor.unconditional(1)[0, 0], bcmi_checkpoint["state"]["learnable_vector"][0, 0])
    bg = gradient_background(120, 90)
    r = comp.paste(noise_object(), bg, (20, 20, 90, 80), seed=0, **FAST)
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])


def test_converter_names_a_missing_key(bcmi_checkpoint, tmp_path):
    from composekit_export.convert_objectstitch import convert_objectstitch

    for dropped, expected in (("cond_stage_model.mapper.resblocks.1.ln_2.bias", "norm3"),
                              ("model.diffusion_model.out.2.bias", "out.2.bias")):
        partial = dict(bcmi_checkpoint["state"])
        del partial[dropped]
        path = tmp_path / f"missing-{expected}.pth"
        torch.save({"state_dict": partial}, path)
        with pytest.raises(ModelError, match=expected.replace(".", r"\.")):
            convert_objectstitch(path, bcmi_checkpoint["clip"], tmp_path / f"out-{expected}", size="tiny")
        assert not (tmp_path / f"out-{expected}").exists()


def test_converter_refuses_unsafe_pickles(bcmi_checkpoint, tmp_path):
    from composekit_export.convert_objectstitch import convert_objectstitch

    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(UnsafeModelFileError, match="weights_only"):
        convert_objectstitch(path, bcmi_checkpoint["clip"], tmp_path / "out", size="tiny")
    assert not (tmp_path / "out").exists()


def test_converter_cli(bcmi_checkpoint, tmp_path):
    out = tmp_path / "cli-out"
    proc = subprocess.run([sys.executable, "-m", "composekit_export", "convert-objectstitch", bcmi_checkpoint["path"],
                           bcmi_checkpoint["clip"], out, "--size", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "UNMAPPED (1)" in proc.stdout and (out / "adaptor" / "config.json").exists()
    proc = subprocess.run([sys.executable, "-m", "composekit_export", "convert-objectstitch", tmp_path / "nope.pth",
                           bcmi_checkpoint["clip"], tmp_path / "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_objectstitch_through_the_cli(os_models, tmp_path):
    gradient_background(100, 80).save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "obj.png")
    proc = subprocess.run([sys.executable, "-m", "composekit", "paste", tmp_path / "obj.png", tmp_path / "bg.png",
                           "--box", "10,10,60,60", "-o", tmp_path / "out.png", "--model", os_models["conv1d"],
                           "--steps", "2", "--seed", "1", "--device", "cpu", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").exists()
