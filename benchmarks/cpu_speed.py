"""CPU speed, one run: diffusers' PaintByExamplePipeline against composekit's runtimes on the same weights.

    python -m benchmarks.cpu_speed --out bench-cpu-speed      # full-size random model, ~30 min on 2 cores

Rows (one process, one after another, nothing else should run): diffusers fp32; composekit torch fp32
and bf16; ONNX Runtime on the plain export and on the fused export (``--optimize cpu``); OpenVINO f32;
and ``Compositor.from_pretrained(export)`` with no options — on a machine without CUDA and with
OpenVINO installed, OpenVINO at its default precision (bf16 on CPUs that have it).

For each row: per-stage times (object encoding, image encoding, one guided U-Net step at batch 2,
decode with the VAE and with the tiny VAE), end to end at two step counts, the per-step slope between
them, and **end to end at 50 steps extrapolated** as fixed cost + 50 x slope (stated as such), with and
without the tiny VAE (the latter: the 50-step figure with the decode stage swapped for the tiny
decoder's). Each row's image at the larger step count is compared with composekit's torch fp32 image
over the edited region (max and mean, 0..255). The tiny VAE is a random TAESD-shaped model: its
speed is TAESD's, its images are not.

Models (built once into ``--models``): ``pbe-full`` (random SD 1.x-sized Paint-by-Example),
``pbe-full-onnx`` (its export with the tiny decoder), ``pbe-full-onnx-fused`` and ``taesd-full``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from composekit import Compositor, __version__

from .harness import _inputs, _timeit, diffusers_pipeline, stage_times

STEPS_TO = 50


def _models(root: Path, size: str) -> dict[str, Path]:
    from composekit_export.onnx_export import export_onnx

    from composekit.apps.random_models import make_random_model, make_random_tiny_vae

    paths = {"model": root / f"pbe-{size}", "taesd": root / f"taesd-{size}", "onnx": root / f"pbe-{size}-onnx",
             "fused": root / f"pbe-{size}-onnx-fused"}
    if not (paths["model"] / "model_index.json").exists():
        make_random_model(paths["model"], size, seed=0, overwrite=True)
    if not (paths["taesd"] / "config.json").exists():
        make_random_tiny_vae(paths["taesd"], size, seed=0, overwrite=True)
    manifest = paths["onnx"] / "manifest.json"
    if not manifest.exists() or "tiny_vae_decoder" not in json.loads(manifest.read_text())["components"]:
        export_onnx(paths["model"], paths["onnx"], tiny_vae=paths["taesd"], overwrite=True)
    if not (paths["fused"] / "manifest.json").exists():
        export_onnx(paths["model"], paths["fused"], optimize="cpu", overwrite=True)
    return paths


def _end_to_end(run: Any, steps: list[int]) -> tuple[dict[str, Any], Any]:
    """Seconds at each step count (one run each, after the stage warm-ups), slope, and the last image."""
    out: dict[str, Any] = {}
    image = None
    for s in steps:
        start = time.perf_counter()
        image = run(s)
        out[str(s)] = time.perf_counter() - start
    a, b = steps[0], steps[-1]
    slope = (out[str(b)] - out[str(a)]) / (b - a)
    fixed = out[str(a)] - a * slope
    out.update(per_step_s=slope, fixed_s=fixed, at_50_s=fixed + STEPS_TO * slope)
    return out, image


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    paths = _models(Path(args.models), args.size)
    steps = sorted(set(args.steps))
    obj, bg, box = _inputs({"tiny": 64, "full": 512}[args.size])
    guidance = args.guidance
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads()},
        "composekit": __version__, "size": args.size, "steps": steps, "guidance": guidance, "repeats": args.repeats, "rows": {},
    }
    reference: dict[str, np.ndarray] = {}
    mask = np.zeros(bg.shape[:2], bool)
    mask[box[1]:box[3], box[0]:box[2]] = True

    def region_diff(image: Any) -> dict[str, float]:
        d = np.abs(np.asarray(image, np.int16)[mask] - reference["fp32"][mask])
        return {"max": int(d.max()), "mean": float(d.mean())}

    def measure(name: str, comp: Compositor) -> None:
        row: dict[str, Any] = {"backend": comp.backend.name, "describe": comp.backend.describe()}
        row["stages"] = {k: v["median_s"] for k, v in stage_times(comp, args.repeats, 1).items()}
        e2e, image = _end_to_end(lambda s: comp.paste(obj, bg, box, steps=s, guidance=guidance, seed=0,
                                                      progress=False).image, steps)
        row["end_to_end"] = e2e
        reference.setdefault("fp32", np.asarray(image, np.int16))  # the first row (torch fp32) is the reference
        row["diff_vs_torch_fp32"] = region_diff(image)
        results["rows"][name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)

    def add_tiny_vae(name: str, backend: Any) -> None:
        """The row's decode stage with the tiny decoder, and its 50-step figure with that stage swapped in."""
        row = results["rows"][name]
        row["stages"]["decode_tiny"] = _decode_time(backend, args.repeats)
        row["end_to_end"]["at_50_tiny_vae_s"] = row["end_to_end"]["at_50_s"] - row["stages"]["decode"] + \
            row["stages"]["decode_tiny"]

    # One model in memory at a time (a full-size model is ~5 GB; two rows at once ran this 24 GB machine out
    # of memory): each row's compositor is dropped before the next one loads. composekit torch fp32 first:
    # every other row's image is compared with it.
    for name, path, kwargs in (("composekit torch fp32", paths["model"], {"device": "cpu", "dtype": "float32"}),
                               ("composekit torch bf16", paths["model"], {"device": "cpu", "dtype": "bfloat16"}),
                               ("onnxruntime fp32 (plain export)", paths["onnx"], {"backend": "onnxruntime"}),
                               ("onnxruntime fp32 (fused export)", paths["fused"], {"backend": "onnxruntime"}),
                               ("openvino f32", paths["onnx"], {"backend": "openvino", "precision": "f32"}),
                               ("default: from_pretrained(export)", paths["onnx"], {})):
        comp = Compositor.from_pretrained(path, **kwargs)
        measure(name, comp)
        if path == paths["model"]:  # the torch backend shares its modules with a tiny-VAE copy
            add_tiny_vae(name, _with_tiny_vae(comp, paths["taesd"]))
        del comp
        gc.collect()
        if path == paths["onnx"]:  # the same runtime and settings with the export's tiny decoder
            tiny = Compositor.from_pretrained(path, vae="tiny", **kwargs)
            add_tiny_vae(name, tiny.backend)
            del tiny
            gc.collect()

    pipe = diffusers_pipeline(paths["model"], "cpu", "float32")
    pil_mask = Image.fromarray(mask.astype(np.uint8) * 255)

    def diffusers_run(s: int) -> Any:
        g = torch.Generator(device="cpu").manual_seed(0)
        return pipe(example_image=Image.fromarray(obj), image=Image.fromarray(bg), mask_image=pil_mask,
                    num_inference_steps=s, guidance_scale=guidance, generator=g).images[0]

    diffusers_run(1)  # warm-up
    e2e, image = _end_to_end(diffusers_run, steps)
    results["rows"]["diffusers PaintByExamplePipeline fp32"] = {
        "backend": "diffusers", "describe": "cpu, float32", "end_to_end": e2e,
        "diff_vs_torch_fp32": None,
        "diff_note": "n/a: diffusers draws its noise differently (parity on equal noise: tests/test_parity.py)"}
    _ratios(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


def _with_tiny_vae(comp: Compositor, taesd: Path) -> Any:
    """A backend sharing ``comp``'s modules that decodes with the tiny VAE (no second copy of the U-Net)."""
    import copy

    from composekit.backends.torch_backend import load_tiny_vae

    backend = copy.copy(comp.backend.inner)  # the loaded backend, under the compositor's context cache
    backend.components = dict(backend.components)  # the copy's own table: comp keeps decoding with the VAE
    backend.use_tiny_vae(load_tiny_vae(taesd, backend.device, backend.dtype, backend.info.latent_channels))
    return backend


def _decode_time(b: Any, repeats: int) -> float:
    n = b.info.model_size // b.info.vae_scale_factor
    latent = b.asarray(np.random.default_rng(0).standard_normal((1, b.info.latent_channels, n, n)).astype(np.float32))
    return _timeit(lambda: b.decode(latent), repeats, 1, b.synchronize)["median_s"]


def _ratios(results: dict[str, Any]) -> None:
    rows = results["rows"]
    ref = rows["diffusers PaintByExamplePipeline fp32"]["end_to_end"]
    torch_step = rows["composekit torch fp32"]["stages"]["unet_step"]
    torch_decode = rows["composekit torch fp32"]["stages"]["decode"]
    for row in rows.values():
        e2e = row["end_to_end"]
        row["vs_diffusers_at_50"] = ref["at_50_s"] / e2e["at_50_s"]
        if "at_50_tiny_vae_s" in e2e:
            row["vs_diffusers_at_50_tiny_vae"] = ref["at_50_s"] / e2e["at_50_tiny_vae_s"]
        if "stages" in row:
            row["unet_step_vs_torch_fp32"] = torch_step / row["stages"]["unet_step"]
            if "decode_tiny" in row["stages"]:
                row["decode_speedup_tiny_vae"] = row["stages"]["decode"] / row["stages"]["decode_tiny"]
        row["decode_vs_torch_fp32"] = torch_decode / row["stages"]["decode"] if "stages" in row else None


def markdown(results: dict[str, Any]) -> str:
    a, b = results["steps"][0], results["steps"][-1]
    lines = [f"Random Paint-by-Example, size {results['size']} (guidance {results['guidance']}), CPU, "
             f"{results['machine']['threads']} threads; {results['date']}; `{results['command']}`. Stage times: "
             f"median of {results['repeats']} after one warm-up. End to end: one run at {a} and at {b} steps; "
             f"**at 50 steps = fixed + 50 x slope, extrapolated**.", "",
             "| row | runs as | encode object | encode image | U-Net step (x torch fp32) | decode | decode, tiny VAE "
             f"(x faster) | {a} steps | {b} steps | per step | at 50 (x diffusers) | at 50, tiny VAE (x diffusers) "
             "| region diff vs torch fp32 (max / mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        st, e2e = row.get("stages", {}), row["end_to_end"]
        cell = lambda k: f"{st[k]:.2f} s" if k in st else "-"  # noqa: E731
        step = f"{st['unet_step']:.2f} s ({row['unet_step_vs_torch_fp32']:.2f}x)" if st else "-"
        tiny = f"{st['decode_tiny']:.3f} s ({row['decode_speedup_tiny_vae']:.0f}x)" if "decode_tiny" in st else "-"
        at50t = (f"{e2e['at_50_tiny_vae_s']:.0f} s ({row['vs_diffusers_at_50_tiny_vae']:.2f}x)"
                 if "at_50_tiny_vae_s" in e2e else "-")
        d = row.get("diff_vs_torch_fp32")
        dtext = row.get("diff_note") or ("reference" if d is None else f"{d['max']} / {d['mean']:.2f}")
        lines.append(f"| {name} | {row['describe']} | {cell('encode_object')} | {cell('encode_image')} | {step} | "
                     f"{cell('decode')} | {tiny} | {e2e[str(a)]:.1f} s | {e2e[str(b)]:.1f} s | "
                     f"{e2e['per_step_s']:.2f} s | {e2e['at_50_s']:.0f} s ({row['vs_diffusers_at_50']:.2f}x) | "
                     f"{at50t} | {dtext} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="full",
                   help="full: SD 1.x dimensions (the figures); tiny: a seconds-long smoke run")
    p.add_argument("--steps", type=int, nargs=2, default=[2, 4], help="the two end-to-end step counts (default 2 4)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2, help="stage-time repeats after one warm-up (default 2)")
    p.add_argument("--models", default=".bench-models", help="where the random models and exports are cached")
    p.add_argument("--out", default="bench-cpu-speed")
    args = p.parse_args(argv)
    print(markdown(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
