"""Latency harness: composekit's backends against diffusers' PaintByExamplePipeline, same weights, same run.

    python -m benchmarks --size tiny --out bench-out
    python -m benchmarks --size full --steps 2 4 --repeats 1 --out bench-full
    python -m benchmarks --size full --device cuda --dtype float16 --steps 25 50 --variants default compile \
        --check-fp32 --out bench-h100          # the GPU run the speed issue asks for

What it measures (warm-up runs excluded; medians and spread over ``--repeats``):

- per stage, by calling each backend's components directly: object encoding, background encoding,
  one guided U-Net step (batch 2), VAE decode;
- end to end, ``Compositor.paste`` on a background of the model's size, for each ``--steps``; the
  per-step cost is the slope between the two largest step counts;
- the same end-to-end measurement of diffusers' ``PaintByExamplePipeline`` (DDIM scheduler, same
  weights, same steps and guidance), so every end-to-end figure has a ratio;
- throughput over ``--batch`` backgrounds, peak host memory (process peak RSS) and, on CUDA, peak
  GPU memory.

Models are random-weight models of the real dimensions built with composekit's own builder
(latency does not depend on weight values). Outputs: ``results.json``, ``results.md`` and
``stages.png`` in ``--out``. Needs the ``torch`` extra; ONNX Runtime rows need an ONNX export (made
on the fly with ``--onnx``), and the plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from composekit import Compositor, __version__

STAGES = ("encode_object", "encode_image", "unet_step", "decode")

# --variants: PyTorch-backend options measured as separate rows ("default" = the backend's own defaults:
# channels-last on CUDA, NCHW on the CPU, no compilation).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "nchw": {"channels_last": False},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile-reduce-overhead": {"compile": "reduce-overhead"},
    "compile-max-autotune": {"compile": "max-autotune"},
}


def _timeit(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "p25_s": q(0.25),
            "p75_s": q(0.75), "n": len(times)}


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Peers timed call by call: one warm-up round (each call once, in order), then ``repeats`` rounds of each call
    in turn, so a change in the machine's speed hits every peer alike. Returns each call's seconds per round and
    its last result."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    last: dict[str, Any] = {}
    for round_ in range(repeats + 1):
        for name, fn in calls.items():
            start = time.perf_counter()
            last[name] = fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times, last


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference of ``a`` from the reference ``b``, relative to ``b``'s largest magnitude."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
CLASSES = ("other", "AVX2", "AVX-512", "AVX-512-BF16", "AMX")  # weakest first
# Environment variables that cap the instructions the math libraries use below what the CPU has (an AVX2 CPU
# emulated on a newer one): oneDNN (torch's convolutions, OpenVINO's kernels), ATen's vectorized kernels, MKL.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _class_of_onednn_isa(value: str) -> str | None:
    """The class a ``ONEDNN_MAX_CPU_ISA`` value allows (None: no cap, or one this harness does not know). Whether
    it allows bfloat16 is the OpenVINO backend's decision (:func:`isa_cap_allows_bf16`), so a run labelled BF16 is
    one the backend computes in bf16."""
    from composekit.backends.openvino_backend import isa_cap_allows_bf16

    isa = value.strip().upper()
    if isa in ("", "ALL", "DEFAULT"):
        return None
    if "AMX" in isa:
        return "AMX"
    if isa_cap_allows_bf16(isa):
        return "AVX-512-BF16"
    if isa.startswith("AVX512"):
        return "AVX-512"
    if isa.startswith("AVX2"):
        return "AVX2"
    return "other" if isa in ("SSE41", "AVX") else None


def cpu_description() -> dict[str, Any]:
    """The CPU's model name (with its family and model numbers: a virtual machine's name can be as vague as
    "AMD EPYC", and two hosts of one class ran OpenVINO's int8 kernels 2x apart) and the vector/matrix flags that
    decide which number formats are fast (from /proc/cpuinfo; ``class`` is AMX, AVX-512-BF16, AVX-512 or AVX2,
    the best it has).

    With ``ONEDNN_MAX_CPU_ISA`` set below the CPU's class (:data:`ISA_CAPS`: emulating an older CPU), ``class`` is
    the capped one, ``hardware_class`` the CPU's own and ``isa_cap`` the variables set, so a run under a cap is
    never reported as the hardware's."""
    name, flags, numbers = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key in ("cpu family", "model") and key not in numbers:
                numbers[key] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if len(numbers) == 2:
        name = f"{name} (family {numbers['cpu family']}, model {numbers['model']})"
    present = [f for f in CPU_FLAGS if f in flags]
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512-BF16" if "avx512_bf16" in flags else
            "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other")
    out: dict[str, Any] = {"model": name, "flags": present, "class": kind, "cores": os.cpu_count()}
    caps = {var: os.environ[var] for var in ISA_CAPS if os.environ.get(var)}
    if caps:
        out["isa_cap"] = caps
        capped = _class_of_onednn_isa(caps.get("ONEDNN_MAX_CPU_ISA", ""))
        if capped is not None and CLASSES.index(capped) < CLASSES.index(kind):
            out.update({"class": capped, "hardware_class": kind})
    return out


def cpu_label(cpu: dict[str, Any]) -> str:
    """``cpu_description()``'s class for a report's header, naming an emulation as such."""
    if "hardware_class" not in cpu:
        return cpu["class"]
    caps = ", ".join(f"{k}={v}" for k, v in cpu["isa_cap"].items())
    return f"{cpu['class']} (emulated on a CPU of class {cpu['hardware_class']}, capped by {caps})"


def openvino_precision() -> str:
    """The precision the OpenVINO backend's default picks on this CPU: bf16 where OpenVINO reports it and no
    ``ONEDNN_MAX_CPU_ISA`` cap keeps its kernels below it, else f32."""
    import openvino as ov

    from composekit.backends.openvino_backend import default_precision

    return default_precision(set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                             os.environ.get("ONEDNN_MAX_CPU_ISA"))


def report(result: dict[str, Any], text: str, out: str | None) -> None:
    """Print a one-off benchmark's Markdown and, with ``out``, write ``OUT.json`` (the figures) and ``OUT.md``."""
    print(text)
    if out:
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(text)


def _inputs(size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    obj = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    q = size // 4
    return obj, bg, (q, q, 3 * q, 3 * q)


def stage_times(comp: Compositor, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    b = comp.backend.inner  # the loaded backend itself: the compositor's context cache would answer repeats
    info = b.info
    m, f = info.model_size, info.vae_scale_factor
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    image = b.asarray(rng.uniform(-1, 1, (1, 3, m, m)).astype(np.float32))
    latent = b.asarray(rng.standard_normal((1, info.latent_channels, m // f, m // f)).astype(np.float32))
    sample = b.asarray(rng.standard_normal((2, info.unet_in_channels, m // f, m // f)).astype(np.float32))
    cond, uncond = b.encode_object(pixels)
    context = b.cat([uncond, cond], 0)
    calls = {
        "encode_object": lambda: b.encode_object(pixels),
        "encode_image": lambda: b.encode_image(image),
        "unet_step": lambda: b.unet(sample, 500, context),
        "decode": lambda: b.decode(latent),
    }
    if info.feature_cache:  # feature caching's shallow pass, on the features of one full pass
        _, features = b.unet_with_features(sample, 500, context)
        calls["unet_shallow"] = lambda: b.unet_shallow(sample, 400, context, features)
    return {k: _timeit(fn, repeats, warmup, b.synchronize) for k, fn in calls.items()}


def end_to_end(run: Callable[[int], Any], steps: list[int], repeats: int, warmup: int,
               sync: Callable[[], None]) -> dict[str, Any]:
    out: dict[str, Any] = {str(s): _timeit(lambda s=s: run(s), repeats, warmup, sync) for s in steps}
    if len(steps) >= 2:
        a, c = sorted(steps)[-2:]
        out["per_step_s"] = (out[str(c)]["median_s"] - out[str(a)]["median_s"]) / (c - a)
    return out


def diffusers_pipeline(model_dir: Path, device: str, dtype: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    try:  # newer diffusers moved it under pipelines/deprecated
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline
    except ImportError:
        from diffusers.pipelines.paint_by_example import PaintByExamplePipeline
    from transformers import CLIPImageProcessor

    from composekit.backends.torch_backend import image_encoder_class, quiet_loading

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with quiet_loading():
        pipe = PaintByExamplePipeline(
            vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
            image_encoder=image_encoder_class().from_pretrained(model_dir / "image_encoder"),
            unet=UNet2DConditionModel.from_pretrained(model_dir / "unet"),
            scheduler=DDIMScheduler.from_pretrained(model_dir / "scheduler", clip_sample=False),
            safety_checker=None,
            feature_extractor=CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor"),
        ).to(device, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from composekit.apps.random_models import make_random_model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.models)
    model_dir = cache / f"pbe-{args.size}"
    if not (model_dir / "model_index.json").exists():
        make_random_model(model_dir, args.size, seed=0, overwrite=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    steps = sorted(set(args.steps))
    obj, bg, box = _inputs({"tiny": 64, "full": 512}[args.size])
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "composekit": __version__, "size": args.size, "device": device, "dtype": dtype, "steps": steps,
        "guidance": args.guidance, "repeats": args.repeats, "warmup": args.warmup, "rows": {},
    }
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    paste_kw = dict(steps=steps[-1], guidance=args.guidance, seed=0, progress=False)
    reference: dict[str, Any] = {}

    def fp32_diff(comp: Compositor, options: dict[str, Any], at: int) -> dict[str, float]:
        """Region difference (0..255) from composekit's fp32 PyTorch result on this device, same seed and steps."""
        if at not in reference:
            ref = Compositor.from_pretrained(model_dir, device=device, dtype="float32")
            r = ref.paste(obj, bg, box, **{**paste_kw, "steps": at})
            reference[at] = np.asarray(r.image, np.int16)[r.mask]
            del ref
        r = comp.paste(obj, bg, box, **{**paste_kw, "steps": at}, **options)
        diff = np.abs(np.asarray(r.image, np.int16)[r.mask] - reference[at])
        return {"steps": at, "max": int(diff.max()), "mean": float(diff.mean())}

    def measure(name: str, comp: Compositor, options: dict[str, Any] | None = None) -> None:
        """One row; ``options`` (e.g. ``cache_interval``) go to every paste, whose step counts are then rounded
        down to multiples of the caching interval (its per-step cost is periodic)."""
        options = options or {}
        interval = options.get("cache_interval", 1)
        row_steps = sorted({s - s % interval for s in steps})
        row: dict[str, Any] = {"backend": comp.backend.name, "describe": comp.backend.describe(), "paste": options,
                               "steps": row_steps}
        row["stages"] = stage_times(comp, args.repeats, args.warmup)
        row["end_to_end"] = end_to_end(
            lambda s: comp.paste(obj, bg, box, steps=s, guidance=args.guidance, seed=0, progress=False, **options),
            row_steps, args.repeats, args.warmup, sync)
        start = time.perf_counter()
        for i in range(args.batch):
            comp.paste(obj, np.roll(bg, i, axis=1), box, steps=row_steps[0], guidance=args.guidance, seed=i,
                       progress=False, **options)
        sync()
        row["throughput_images_per_s"] = args.batch / (time.perf_counter() - start)
        row["throughput_steps"] = row_steps[0]
        if args.check_fp32:
            row["diff_vs_fp32"] = fp32_diff(comp, options, row_steps[-1])
        results["rows"][name] = row

    for variant in args.variants:
        suffix = "" if variant == "default" else f"-{variant}"
        comp = Compositor.from_pretrained(model_dir, device=device, dtype=dtype, **VARIANTS[variant])
        measure(f"composekit-torch-{dtype}{suffix}", comp)
        for interval in args.cache_intervals or []:  # feature caching, same compositor
            measure(f"composekit-torch-{dtype}{suffix}-cache{interval}", comp, {"cache_interval": interval})
        del comp
    if args.onnx:
        from composekit_export.onnx_export import export_onnx

        onnx_dir = cache / f"pbe-{args.size}-onnx"
        if not (onnx_dir / "manifest.json").exists():
            export_onnx(model_dir, onnx_dir, overwrite=True)
        measure("composekit-onnxruntime-fp32", Compositor.from_pretrained(onnx_dir, backend="onnxruntime",
                                                                          device="cpu"))
    if not args.no_diffusers:
        pipe = diffusers_pipeline(model_dir, device, dtype)
        size = bg.shape[0]
        mask = np.zeros((size, size), np.uint8)
        mask[box[1]:box[3], box[0]:box[2]] = 255
        pil_bg, pil_obj, pil_mask = Image.fromarray(bg), Image.fromarray(obj), Image.fromarray(mask)

        def diff(s: int):
            g = torch.Generator(device="cpu").manual_seed(0)
            return pipe(example_image=pil_obj, image=pil_bg, mask_image=pil_mask, num_inference_steps=s,
                        guidance_scale=args.guidance, generator=g).images[0]

        results["rows"]["diffusers-PaintByExamplePipeline"] = {
            "backend": "diffusers", "describe": f"{device}, {dtype}",
            "end_to_end": end_to_end(diff, steps, args.repeats, args.warmup, sync)}
    results["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    _ratios(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    _plot(results, out_dir / "stages.png")
    return results


def _ratios(results: dict[str, Any]) -> None:
    ref = results["rows"].get("diffusers-PaintByExamplePipeline")
    if not ref:
        return
    for name, row in results["rows"].items():
        if row is ref:
            continue
        row["ratio_vs_diffusers"] = {
            s: ref["end_to_end"][s]["median_s"] / row["end_to_end"][s]["median_s"]
            for s in row["end_to_end"] if s != "per_step_s" and s in ref["end_to_end"]
        }
        if "per_step_s" in row["end_to_end"] and "per_step_s" in ref["end_to_end"]:
            row["ratio_vs_diffusers"]["per_step"] = ref["end_to_end"]["per_step_s"] / row["end_to_end"]["per_step_s"]


def markdown(results: dict[str, Any]) -> str:
    steps = [str(s) for s in results["steps"]]
    lines = [f"Size `{results['size']}`, device `{results['device']}`, dtype `{results['dtype']}`, guidance "
             f"{results['guidance']}, {results['repeats']} repeats after {results['warmup']} warm-up; "
             f"{results['date']}; `{results['command']}`", ""]
    lines.append("| row | " + " | ".join(f"{s} steps (s)" for s in steps) +
                 " | per step (s) | speed-up vs diffusers | diff vs fp32 (max / mean, 0..255) |")
    lines.append("|---|" + "---|" * (len(steps) + 3))
    for name, row in results["rows"].items():
        e2e = row["end_to_end"]
        # A cached row runs at multiples of its interval: its own step counts are shown beside the figures.
        own = [str(x) for x in row.get("steps", results["steps"])]
        cells = [f"{e2e[s]['median_s']:.3f}" if s in e2e else f"{e2e[o]['median_s']:.3f} (at {o})"
                 for s, o in zip(steps, own)]
        per = f"{e2e['per_step_s']:.3f}" if "per_step_s" in e2e else "-"
        ratio = row.get("ratio_vs_diffusers", {})
        rtext = ", ".join(f"{k}: {v:.2f}x" for k, v in ratio.items()) if ratio else "(reference)"
        d = row.get("diff_vs_fp32")
        dtext = f"{d['max']} / {d['mean']:.2f}" if d else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per} | {rtext} | {dtext} |")
    lines += ["", "| row | " + " | ".join(STAGES) + " | throughput (img/s) |", "|---|" + "---|" * (len(STAGES) + 1)]
    for name, row in results["rows"].items():
        if "stages" in row:
            cells = [f"{row['stages'][s]['median_s'] * 1000:.1f} ms" for s in STAGES]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | {row['throughput_images_per_s']:.2f} ({row['throughput_steps']} steps) |")
    lines += ["", f"Peak host RSS: {results['peak_host_rss_mb']:.0f} MB" +
              (f"; peak GPU memory: {results['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in results else ""), ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = {k: v for k, v in results["rows"].items() if "stages" in v}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(rows), 1)
    for i, (name, row) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(STAGES))], [row["stages"][s]["median_s"] * 1000 for s in STAGES],
               width, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(STAGES))], STAGES)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"per-stage latency, {results['size']} model, {results['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="end-to-end step counts (default 5 10)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="backgrounds in the throughput run")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default"],
                   help="PyTorch-backend options to measure, one row each (default: the backend's defaults)")
    p.add_argument("--check-fp32", action="store_true",
                   help="report each row's difference from composekit's fp32 result at the largest step count")
    p.add_argument("--cache-intervals", type=int, nargs="*", default=None, metavar="N",
                   help="also measure each variant with feature caching at these intervals (step counts rounded "
                        "down to multiples of N)")
    p.add_argument("--onnx", action="store_true", help="also measure the onnxruntime backend (exports if needed)")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--models", default=".bench-models", help="where random models are cached")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    results = run(args)
    print(markdown(results))
    return 0
