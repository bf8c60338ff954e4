"""How fast a cached int8 U-Net could be on this CPU at best: the U-Net's arithmetic against the CPU's measured
peak rate (its best layer kernel, measured), as a ratio against diffusers' own U-Net step measured in the same run.

    python -m benchmarks.compute_ceiling --model .bench-models/pbe-full --out bench-compute-ceiling

1. **Arithmetic**: the full U-Net pass and the shallow pass (feature caching's), batch 2 as classifier-free
   guidance runs them, counted by torch's ``FlopCounterMode`` on an empty (meta) U-Net built from the model's
   config (its convolutions and matrix products; norms, activations and softmax are not counted), as composekit
   runs it (cross-attention to the one-token context as a broadcast; diffusers' own count is reported beside it).
2. **The CPU's peak, measured**: single OpenVINO layers of the U-Net's sizes - fully connected layers (its
   feed-forward layers, and one larger) and 3x3 convolutions (each level's resnets) - in int8 (a FakeQuantize'd
   input and int8 weights: OpenVINO's low-precision kernels, the ones an ``--int8`` export's U-Net runs), in bf16
   where the CPU has it, and in f32; the best of five calls of the best layer: the most generous figure.
3. **diffusers' U-Net step**: ``UNet2DConditionModel`` in fp32 (torch), batch 2, median of ``--repeats`` calls.
4. **The ceiling**: the least time ``--steps`` U-Net steps with one full pass in ``--cache-interval`` could take
   if every counted operation ran at the int8 peak and nothing else cost anything, and diffusers' U-Net time for
   as many steps divided by it. No real int8 U-Net reaches the bound (its norms, softmax and memory traffic are
   left out), and adding the fixed costs (VAE, image encoder) to both sides cannot raise the end-to-end ratio
   above the larger of this ratio and the fixed costs' own ratio.

Not a unit test: a bound, to tell what a speed target asks of a CPU before chasing it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .harness import _timeit, cpu_description, cpu_label, openvino_precision, report

# The U-Net's two kinds of heavy layer at batch 2, as (kind, shape): fully connected (tokens, in, out) - the
# 64x64 level's feed-forward (GEGLU 320 -> 2 x 1280), the 32x32 level's (640 -> 2 x 2560) and one larger than any
# of them - and 3x3 convolutions (channels, side) of each level's resnets. The peak is the best of all of them, so
# that it is generous: the bound must hold for every layer the U-Net has.
LAYERS = (("fc", (8192, 320, 2560)), ("fc", (2048, 640, 5120)), ("fc", (8192, 1280, 5120)),
          ("conv3x3", (320, 64)), ("conv3x3", (640, 32)), ("conv3x3", (1280, 16)))


def unet_flops(model: Path) -> dict[str, float]:
    """FLOPs of one full and one shallow U-Net pass at batch 2 (counted on meta tensors: nothing is allocated):
    ``full``/``shallow`` as composekit runs them (cross-attention to the one-token context as a broadcast,
    composekit.backends.single_token_attention), ``full_diffusers``/``shallow_diffusers`` with diffusers' own
    attention."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from composekit.backends.single_token_attention import apply
    from composekit.backends.unet_split import ShallowUNet, feature_channels

    config = UNet2DConditionModel.load_config(str(model / "unet"))
    out = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        side, channels = unet.config.sample_size, unet.config.in_channels
        sample = torch.randn(2, channels, side, side)
        timestep = torch.tensor([500, 500])
        context = torch.randn(2, 1, unet.config.cross_attention_dim)
        features = torch.randn(2, feature_channels(unet), side, side)

        def count(suffix: str) -> None:
            for name, run in (("full", lambda: unet(sample, timestep, encoder_hidden_states=context)),
                              ("shallow", lambda: ShallowUNet(unet)(sample, timestep, context, features))):
                with FlopCounterMode(display=False) as counter:
                    run()
                out[name + suffix] = float(counter.get_total_flops())

        count("_diffusers")  # diffusers' attention
        apply(unet)
        count("")  # as composekit runs it
    return out


def _layer(kind: str, shape: tuple[int, ...], int8: bool) -> tuple[Any, tuple[int, ...], float]:
    """An OpenVINO model of one layer (int8: a FakeQuantize'd input and int8 weights, which OpenVINO's
    low-precision kernels run), its input shape and its operation count."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    if kind == "fc":
        tokens, width, out = shape
        x_shape, w_shape, ops_count = (tokens, width), (out, width), 2.0 * tokens * width * out
    else:
        channels, side = shape
        x_shape, w_shape = (2, channels, side, side), (channels, channels, 3, 3)
        ops_count = 2.0 * 2 * side * side * channels * channels * 9
    x = ops.parameter(list(x_shape), np.float32)
    if int8:
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_in = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        scale = np.full((w_shape[0],) + (1,) * (len(w_shape) - 1), 0.01, np.float32)
        weight = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 128, w_shape).astype(np.int8)), "f32"),
                              ops.constant(scale))
    else:
        x_in, weight = x, ops.constant(rng.standard_normal(w_shape).astype(np.float32))
    y = ops.matmul(x_in, weight, False, True) if kind == "fc" else \
        ops.convolution(x_in, weight, [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([y], [x]), x_shape, ops_count


def kernel_peaks(bf16: bool) -> dict[str, Any]:
    """The best measured throughput (ops/s) of each format over :data:`LAYERS`, with the layer and kernel."""
    import openvino as ov

    core = ov.Core()
    formats = [("int8", True, "bf16" if bf16 else "f32"), ("f32", False, "f32")]
    if bf16:
        formats.insert(1, ("bf16", False, "bf16"))
    peaks: dict[str, Any] = {}
    for name, int8, precision in formats:
        best: dict[str, Any] = {"ops_per_s": 0.0}
        for kind, shape in LAYERS:
            model, x_shape, ops_count = _layer(kind, shape, int8)
            compiled = core.compile_model(model, "CPU",
                                          {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
            kernel = next(op.get_rt_info()["primitiveType"].astype(str)
                          for op in compiled.get_runtime_model().get_ordered_ops()
                          if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul", "Convolution"))
            request = compiled.create_infer_request()
            x = np.random.default_rng(1).uniform(-4, 4, x_shape).astype(np.float32)
            timing = _timeit(lambda r=request, x=x: r.infer([x]), repeats=5, warmup=1, sync=lambda: None)
            rate = ops_count / timing["min_s"]
            if rate > best["ops_per_s"]:
                best = {"ops_per_s": rate, "layer": kind, "shape": list(shape), "kernel": kernel}
        peaks[name] = best
    return peaks


def diffusers_unet_step(model: Path, repeats: int) -> float:
    """Median seconds of one fp32 ``UNet2DConditionModel`` pass at batch 2 (diffusers' guided step)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model / "unet")).eval()
    side, channels = unet.config.sample_size, unet.config.in_channels
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, channels, side, side, generator=gen)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor([500, 500])
    with torch.inference_mode():
        return _timeit(lambda: unet(sample, timestep, encoder_hidden_states=context), repeats, warmup=1,
                       sync=lambda: None)["median_s"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu = cpu_description()
    flops = unet_flops(args.model)
    # bf16 where OpenVINO reports it, as the OpenVINO backend decides (not from the CPU's flags)
    precision = openvino_precision()
    peaks = kernel_peaks(bf16=precision == "bf16")
    step = diffusers_unet_step(args.model, args.repeats)
    full = math.ceil(args.steps / args.cache_interval)  # a full pass on the first step and every N-th
    shallow = args.steps - full
    int8 = peaks["int8"]["ops_per_s"]
    ceiling = (full * flops["full"] + shallow * flops["shallow"]) / int8
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(sys.argv), "machine": cpu, "model": str(args.model),
        "steps": args.steps, "cache_interval": args.cache_interval, "full_passes": full, "shallow_passes": shallow,
        "unet_gflop": {k: v / 1e9 for k, v in flops.items()},
        "peaks_gops": {k: {**v, "ops_per_s": v["ops_per_s"] / 1e9} for k, v in peaks.items()},
        "full_pass_at_int8_peak_s": flops["full"] / int8,
        "diffusers_unet_step_s": step,
        "diffusers_effective_gflops": flops["full"] / step / 1e9,
        "unet_ceiling_s": ceiling,
        "diffusers_unet_s": args.steps * step,
        "ceiling_ratio": args.steps * step / ceiling,
    }


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# U-Net compute ceiling ({r['date']})", "",
             f"CPU: {m['model']}, class {cpu_label(m)} ({', '.join(m['flags'])}), {m['cores']} cores", "",
             (f"U-Net at batch 2, as composekit runs it: full pass {r['unet_gflop']['full']:.0f} GFLOP, shallow pass "
              f"{r['unet_gflop']['shallow']:.0f} GFLOP (with diffusers' cross-attention: "
              f"{r['unet_gflop']['full_diffusers']:.0f} and {r['unet_gflop']['shallow_diffusers']:.0f})"), "",
             "| format | best measured rate | layer (fc: tokens, in, out; conv3x3: channels, side at batch 2) | kernel |",
             "|---|---|---|---|"]
    for name, p in r["peaks_gops"].items():
        lines.append(f"| {name} | {p['ops_per_s']:.0f} GOPS | {p['layer']} {p['shape']} | {p['kernel']} |")
    lines += ["",
              (f"- diffusers fp32 U-Net step: {r['diffusers_unet_step_s']:.2f} s "
               f"({r['diffusers_effective_gflops']:.0f} GFLOP/s effective)"),
              f"- a full pass with every counted operation at the int8 peak: {r['full_pass_at_int8_peak_s']:.2f} s",
              (f"- {r['steps']} steps, one full pass in {r['cache_interval']} ({r['full_passes']} full, "
               f"{r['shallow_passes']} shallow) at the int8 peak: {r['unet_ceiling_s']:.1f} s against diffusers' "
               f"{r['diffusers_unet_s']:.0f} s: **at most {r['ceiling_ratio']:.1f}x** (U-Net time only)")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path(".bench-models/pbe-full"),
                        help="a full-size model directory (random weights are fine: only shapes and time count)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cache-interval", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="diffusers U-Net passes timed (median)")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.cache_interval < 1 or args.repeats < 1:
        parser.error("--steps, --cache-interval and --repeats must be positive")
    result = run(args)
    report(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
