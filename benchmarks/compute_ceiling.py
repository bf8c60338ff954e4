"""How fast a cached int8 U-Net could be on this CPU at best: the U-Net's arithmetic against the CPU's measured
matrix-multiply peak, as a ratio against diffusers' own U-Net step measured in the same run.

    python -m benchmarks.compute_ceiling --model .bench-models/pbe-full --out bench-compute-ceiling

1. **Arithmetic**: the full U-Net pass and the shallow pass (feature caching's), batch 2 as classifier-free
   guidance runs them, counted by torch's ``FlopCounterMode`` on an empty (meta) U-Net built from the model's
   config (its convolutions and matrix products; norms, activations and softmax are not counted).
2. **The CPU's matrix-multiply peak, measured**: OpenVINO fully connected layers of the U-Net's sizes (tokens x
   width of its feed-forward layers and of a 3x3 convolution unrolled), in int8 (a FakeQuantize'd input and int8
   weights: OpenVINO's low-precision kernels, the ones an ``--int8`` export's U-Net runs), in bf16 where the CPU
   has it, and in f32; the best of five calls of the best shape: the most generous figure this CPU gives.
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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import cpu_description, report

# (tokens, in, out) of fully connected layers the U-Net runs at batch 2: the 64x64 level's feed-forward (GEGLU
# 320 -> 2 x 1280), the 32x32 level's (640 -> 2 x 2560), a 3x3 convolution of 320 channels unrolled; and a larger
# one than any of them (the kernels' best case on this project's CPUs), so that the peak is generous.
SHAPES = ((8192, 320, 2560), (2048, 640, 5120), (8192, 2880, 320), (8192, 1280, 5120))


def unet_flops(model: Path) -> dict[str, float]:
    """FLOPs of one full and one shallow U-Net pass at batch 2 (counted on meta tensors: nothing is allocated)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from composekit.backends.unet_split import ShallowUNet, feature_channels

    config = UNet2DConditionModel.load_config(str(model / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        side, channels = unet.config.sample_size, unet.config.in_channels
        sample = torch.randn(2, channels, side, side)
        timestep = torch.tensor([500, 500])
        context = torch.randn(2, 1, unet.config.cross_attention_dim)
        features = torch.randn(2, feature_channels(unet), side, side)
        out = {}
        for name, run in (("full", lambda: unet(sample, timestep, encoder_hidden_states=context)),
                          ("shallow", lambda: ShallowUNet(unet)(sample, timestep, context, features))):
            with FlopCounterMode(display=False) as counter:
                run()
            out[name] = float(counter.get_total_flops())
    return out


def _fc(tokens: int, width: int, out: int, int8: bool) -> Any:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([tokens, width], np.float32)
    if int8:
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_in = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w = ops.constant(rng.integers(-127, 128, (out, width)).astype(np.int8))
        weight = ops.multiply(ops.convert(w, "f32"), ops.constant(np.full((out, 1), 0.01, np.float32)))
    else:
        x_in, weight = x, ops.constant(rng.standard_normal((out, width)).astype(np.float32))
    return ov.Model([ops.matmul(x_in, weight, False, True)], [x])


def matmul_peaks(bf16: bool) -> dict[str, Any]:
    """The best measured throughput (ops/s) of each format over :data:`SHAPES`, with the kernel that ran."""
    import openvino as ov

    core = ov.Core()
    formats = [("int8", True, "bf16" if bf16 else "f32"), ("f32", False, "f32")]
    if bf16:
        formats.insert(1, ("bf16", False, "bf16"))
    peaks: dict[str, Any] = {}
    for name, int8, precision in formats:
        best: dict[str, Any] = {"ops_per_s": 0.0}
        for tokens, width, out in SHAPES:
            compiled = core.compile_model(_fc(tokens, width, out, int8), "CPU",
                                          {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
            kernel = next(op.get_rt_info()["primitiveType"].astype(str)
                          for op in compiled.get_runtime_model().get_ordered_ops()
                          if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul"))
            request = compiled.create_infer_request()
            x = np.random.default_rng(1).uniform(-4, 4, (tokens, width)).astype(np.float32)
            request.infer([x])  # warm-up
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                request.infer([x])
                seconds.append(time.perf_counter() - start)
            rate = 2 * tokens * width * out / min(seconds)
            if rate > best["ops_per_s"]:
                best = {"ops_per_s": rate, "shape": [tokens, width, out], "kernel": kernel}
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
    times = []
    with torch.inference_mode():
        unet(sample, timestep, encoder_hidden_states=context)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            unet(sample, timestep, encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu = cpu_description()
    flops = unet_flops(args.model)
    peaks = matmul_peaks(bf16=cpu["class"] in ("AMX", "AVX-512-BF16"))
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
             f"CPU: {m['model']}, class {m['class']} ({', '.join(m['flags'])}), {m['cores']} cores", "",
             f"U-Net at batch 2: full pass {r['unet_gflop']['full']:.0f} GFLOP, shallow pass "
             f"{r['unet_gflop']['shallow']:.0f} GFLOP", "",
             "| format | best measured matrix-multiply rate | shape (tokens, in, out) | kernel |", "|---|---|---|---|"]
    for name, p in r["peaks_gops"].items():
        lines.append(f"| {name} | {p['ops_per_s']:.0f} GOPS | {p['shape']} | {p['kernel']} |")
    lines += ["",
              f"- diffusers fp32 U-Net step: {r['diffusers_unet_step_s']:.2f} s "
              f"({r['diffusers_effective_gflops']:.0f} GFLOP/s effective)",
              f"- a full pass with every counted operation at the int8 peak: {r['full_pass_at_int8_peak_s']:.2f} s",
              f"- {r['steps']} steps, one full pass in {r['cache_interval']} ({r['full_passes']} full, "
              f"{r['shallow_passes']} shallow) at the int8 peak: {r['unet_ceiling_s']:.1f} s against diffusers' "
              f"{r['diffusers_unet_s']:.0f} s: **at most {r['ceiling_ratio']:.1f}x** (U-Net time only)"]
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
