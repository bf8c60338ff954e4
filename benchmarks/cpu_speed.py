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

To measure an older CPU class on a newer CPU, cap the math libraries' instructions (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``): the header then names the class as emulated, and the
OpenVINO backend's default precision follows the cap (f32 below BF16).

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

from .harness import CPU_FLAGS, _inputs, _timeit, cpu_description, cpu_label, diffusers_pipeline, stage_times

STEPS_TO = 50


# The exports the rows run on: name -> export_onnx options (with tiny_vae=True: the tiny decoder beside the VAE's,
# from the TAESD-shaped random model). The plain export is always built; the others when a row needs them.
EXPORTS: dict[str, dict[str, Any]] = {
    "onnx": {"tiny_vae": True},
    "fused": {"optimize": "cpu"},
    "int8": {"tiny_vae": True, "int8": True},
    "int8-todo2": {"tiny_vae": True, "int8": True, "token_downsampling": 2},
}


def _models(root: Path, size: str, rows: list[str]) -> dict[str, Path]:
    from composekit_export.onnx_export import export_onnx

    from composekit.apps.random_models import make_random_model, make_random_tiny_vae

    paths = {"model": root / f"pbe-{size}", "taesd": root / f"taesd-{size}",
             **{name: root / f"pbe-{size}-{name if name == 'onnx' else 'onnx-' + name}" for name in EXPORTS}}
    if not (paths["model"] / "model_index.json").exists():
        make_random_model(paths["model"], size, seed=0, overwrite=True)
    if not (paths["taesd"] / "config.json").exists():
        make_random_tiny_vae(paths["taesd"], size, seed=0, overwrite=True)

    def current(path: Path, options: dict[str, Any]) -> bool:
        """An export of this composekit's format there, made with ``options``: the components the rows need (and
        int8 graphs with their OpenVINO IR: an int8 export made before the IR would have OpenVINO run its QDQ
        graph), the same token downsampling, and traced with the single-token cross-attention (an export made
        before it computes the full attention)."""
        manifest = path / "manifest.json"
        if not manifest.exists():
            return False
        data = json.loads(manifest.read_text())
        components = data.get("components", {})
        need = ["unet_shallow"] + (["tiny_vae_decoder"] if options.get("tiny_vae") else [])
        return all(n in components for n in need) and \
            (not options.get("int8") or bool(data.get("int8")) and "openvino" in components.get("unet", {})) and \
            (data.get("token_downsampling") or 1) == options.get("token_downsampling", 1) and \
            bool(data.get("single_token_cross_attention"))

    needed = {"onnx"} | {ROWS[r][0] for r in rows}
    for name, options in EXPORTS.items():
        if name in needed and not current(paths[name], options):
            export_onnx(paths["model"], paths[name], overwrite=True,
                        **{**options, "tiny_vae": paths["taesd"] if options.get("tiny_vae") else None})
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


# name -> (model, from_pretrained options, paste options, stages?). "model": the diffusers directory, the
# plain export (with the tiny decoder), the fused export, the int8 export (with the tiny decoder) or the int8
# export with token downsampling 2 traced in (with the tiny decoder).
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any], bool]] = {
    "composekit torch fp32": ("model", {"device": "cpu", "dtype": "float32"}, {}, True),
    "composekit torch bf16": ("model", {"device": "cpu", "dtype": "bfloat16"}, {}, True),
    "onnxruntime fp32 (plain export)": ("onnx", {"backend": "onnxruntime"}, {}, True),
    "onnxruntime fp32 (fused export)": ("fused", {"backend": "onnxruntime"}, {}, True),
    "openvino f32": ("onnx", {"backend": "openvino", "precision": "f32"}, {}, True),
    "default: from_pretrained(export)": ("onnx", {}, {}, True),
    "default, cache_interval=3": ("onnx", {}, {"cache_interval": 3}, False),
    "default, cache_interval=5": ("onnx", {}, {"cache_interval": 5}, False),
    "int8 export: from_pretrained(int8 export)": ("int8", {}, {}, True),
    "int8 export, cache_interval=3": ("int8", {}, {"cache_interval": 3}, False),
    "int8 export, speed='fast'": ("int8", {}, {"speed": "fast"}, False),
    "int8 export, speed='fast', cache_interval=5": ("int8", {}, {"speed": "fast", "cache_interval": 5}, False),
    "int8 export on onnxruntime (QDQ graph)": ("int8", {"backend": "onnxruntime"}, {}, True),
    "torch fp32, token_downsampling=2": ("model", {"device": "cpu", "dtype": "float32", "token_downsampling": 2}, {},
                                         False),
    "int8 + token downsampling 2 export": ("int8-todo2", {}, {}, True),
    "int8 + token downsampling 2 export, cache_interval=3": ("int8-todo2", {}, {"cache_interval": 3}, False),
    "int8 + token downsampling 2 export, speed='fast'": ("int8-todo2", {}, {"speed": "fast"}, False),
}
DEFAULT_ROWS = list(ROWS)


def _cpu_has_bf16(cpu: dict[str, Any]) -> bool:
    return cpu["class"] in ("AMX", "AVX-512-BF16")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    cpu = cpu_description()
    rows = list(args.rows or DEFAULT_ROWS)
    skipped = {}
    if "composekit torch bf16" in rows and not _cpu_has_bf16(cpu) and not args.rows:
        rows.remove("composekit torch bf16")  # emulated bf16 is slow and says nothing about bf16 hardware
        skipped["composekit torch bf16"] = f"this CPU ({cpu['class']}) has no BF16 instructions"
    rows = ["composekit torch fp32"] + [r for r in rows if r != "composekit torch fp32"]  # the image reference
    paths = _models(Path(args.models), args.size, rows)
    steps = sorted(set(args.steps))
    obj, bg, box = _inputs({"tiny": 64, "full": 512}[args.size])
    guidance = args.guidance
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpu": cpu, "python": sys.version.split()[0],
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "composekit": __version__, "size": args.size, "steps": steps, "guidance": guidance, "repeats": args.repeats,
        "skipped": skipped, "rows": {},
    }
    print(f"CPU: {cpu['model']}, class {cpu_label(cpu)} (flags: {', '.join(cpu['flags']) or 'none of ' + str(CPU_FLAGS)}"
          f"), {cpu['cores']} cores", file=sys.stderr, flush=True)
    references: dict[int, np.ndarray] = {}  # composekit torch fp32's image at each step count
    mask = np.zeros(bg.shape[:2], bool)
    mask[box[1]:box[3], box[0]:box[2]] = True

    def paste(comp: Compositor, s: int, options: dict[str, Any]) -> Any:
        return comp.paste(obj, bg, box, steps=s, guidance=guidance, seed=0, progress=False, **options).image

    def region_diff(image: Any, s: int) -> dict[str, Any]:
        d = np.abs(np.asarray(image, np.int16)[mask] - references[s][mask])
        return {"steps": s, "max": int(d.max()), "mean": float(d.mean())}

    def row_steps(options: dict[str, Any]) -> list[int]:
        """Step counts that are multiples of the caching interval (the per-step cost is periodic in it): each of
        ``--steps`` rounded up to one, at least one interval apart."""
        interval = options.get("cache_interval", 3 if options.get("speed") == "fast" else 1)
        if interval == 1:
            return steps
        low, high = (-(-s // interval) * interval for s in (steps[0], steps[-1]))
        return [low, max(high, low + interval)]

    def measure(name: str, comp: Compositor, options: dict[str, Any], stages: bool) -> None:
        row: dict[str, Any] = {"backend": comp.backend.name, "describe": comp.backend.describe(), "paste": options}
        if options:  # its uncached peer: the same model, loaded the same way, pasted with no option
            row["same_runtime_as"] = next((n for n, (w, ld, o, _) in ROWS.items()
                                           if (w, ld) == ROWS[name][:2] and not o), None)
        if stages:
            row["stages"] = {k: v["median_s"] for k, v in stage_times(comp, args.repeats, 1).items()}
        else:
            paste(comp, 1, options)  # warm-up
        row_s = row_steps(options)
        e2e, image = _end_to_end(lambda s: paste(comp, s, options), row_s)
        row["end_to_end"] = e2e
        row["steps"] = row_s
        if name == "composekit torch fp32":
            references[row_s[-1]] = np.asarray(image, np.int16)
        row["image"] = np.asarray(image, np.int16)
        results["rows"][name] = row
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'image'})}", file=sys.stderr, flush=True)

    def add_tiny_vae(name: str, backend: Any) -> None:
        """The row's decode stage with the tiny decoder, and its 50-step figure with that stage swapped in."""
        row = results["rows"][name]
        if "stages" not in row:
            return
        row["stages"]["decode_tiny"] = _decode_time(backend, args.repeats)
        row["end_to_end"]["at_50_tiny_vae_s"] = row["end_to_end"]["at_50_s"] - row["stages"]["decode"] + \
            row["stages"]["decode_tiny"]

    # One model in memory at a time (a full-size model is ~5 GB; two rows at once ran this 24 GB machine out
    # of memory): each row's compositor is dropped before the next one loads. composekit torch fp32 first:
    # every other row's image is compared with it, at the same step count.
    for name in rows:
        where, load, options, stages = ROWS[name]
        comp = Compositor.from_pretrained(paths[where], **load)
        measure(name, comp, options, stages)
        if where == "model":  # the torch backend shares its modules with a tiny-VAE copy
            add_tiny_vae(name, _with_tiny_vae(comp, paths["taesd"]))
        elif stages and EXPORTS[where].get("tiny_vae"):  # the export's tiny decoder, loaded beside its VAE decoder
            add_tiny_vae(name, _FastDecoder(comp.backend.inner))
        if name == "composekit torch fp32":  # the references at the other rows' step counts
            for s in sorted({row_steps(ROWS[r][2])[-1] for r in rows} - set(references)):
                references[s] = np.asarray(paste(comp, s, {}), np.int16)
        del comp
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
        "backend": "diffusers", "describe": "cpu, float32", "end_to_end": e2e, "steps": steps,
        "diff_vs_torch_fp32": None,
        "diff_note": "n/a: diffusers draws its noise differently (parity on equal noise: tests/test_parity.py)"}
    for row in results["rows"].values():
        image = row.pop("image", None)
        if image is not None:
            row["diff_vs_torch_fp32"] = region_diff(image, row["steps"][-1])
    _ratios(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


class _FastDecoder:
    """An export backend's tiny decoder as ``decode`` (for the decode-stage timing)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.info, self.asarray, self.synchronize = backend, backend.info, backend.asarray, \
            backend.synchronize

    def decode(self, latent: Any) -> Any:
        return self.backend.decode(latent, tiny=True)


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
        peer = rows.get(row.get("same_runtime_as") or "")
        if peer is not None:
            row["per_step_vs_same_runtime"] = peer["end_to_end"]["per_step_s"] / e2e["per_step_s"]


def markdown(results: dict[str, Any]) -> str:
    cpu = results["machine"]["cpu"]
    lines = [f"CPU: {cpu['model']}, **{cpu_label(cpu)}** (flags: {', '.join(cpu['flags']) or 'none'}), {cpu['cores']} "
             f"cores. Random Paint-by-Example, size {results['size']} (guidance {results['guidance']}), "
             f"{results['machine']['threads']} torch threads; {results['date']}; `{results['command']}`. Stage times: "
             f"median of {results['repeats']} after one warm-up. End to end: one run at each of two step counts (multiples "
             "of the caching interval for cached rows); **at 50 steps = fixed + 50 x slope, extrapolated**."
             + "".join(f" Skipped: {k} ({v})." for k, v in results.get("skipped", {}).items()), "",
             "| row | runs as | encode object | encode image | U-Net step, guided (x torch fp32) | decode | decode, tiny VAE "
             "(x faster) | end to end (steps: s) | per step (x same runtime uncached) | at 50 (x diffusers) | at 50, "
             "tiny VAE (x diffusers) | region diff vs torch fp32 (max / mean, at steps) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        st, e2e = row.get("stages", {}), row["end_to_end"]
        cell = lambda k: f"{st[k]:.2f} s" if k in st else "-"  # noqa: E731
        step = f"{st['unet_step']:.2f} s ({row['unet_step_vs_torch_fp32']:.2f}x)" if st else "-"
        if "unet_shallow" in st:
            step += f"; shallow pass {st['unet_shallow']:.2f} s"
        tiny = f"{st['decode_tiny']:.3f} s ({row['decode_speedup_tiny_vae']:.0f}x)" if "decode_tiny" in st else "-"
        at50t = (f"{e2e['at_50_tiny_vae_s']:.0f} s ({row['vs_diffusers_at_50_tiny_vae']:.2f}x)"
                 if "at_50_tiny_vae_s" in e2e else "-")
        runs = ", ".join(f"{s}: {e2e[str(s)]:.1f}" for s in row["steps"])
        per_step = f"{e2e['per_step_s']:.2f} s" + (f" ({row['per_step_vs_same_runtime']:.2f}x)"
                                                   if "per_step_vs_same_runtime" in row else "")
        d = row.get("diff_vs_torch_fp32")
        dtext = row.get("diff_note") or ("reference" if name == "composekit torch fp32" else
                                         f"{d['max']} / {d['mean']:.2f} ({d['steps']})")
        lines.append(f"| {name} | {row['describe']} | {cell('encode_object')} | {cell('encode_image')} | {step} | "
                     f"{cell('decode')} | {tiny} | {runs} | {per_step} | {e2e['at_50_s']:.0f} s "
                     f"({row['vs_diffusers_at_50']:.2f}x) | {at50t} | {dtext} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="full",
                   help="full: SD 1.x dimensions (the figures); tiny: a seconds-long smoke run")
    p.add_argument("--steps", type=int, nargs=2, default=[2, 4], help="the two end-to-end step counts (default 2 4)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2, help="stage-time repeats after one warm-up (default 2)")
    p.add_argument("--models", default=".bench-models", help="where the random models and exports are cached")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, metavar="ROW",
                   help=f"rows to measure (default: all; torch bf16 only on CPUs with BF16). One of: {list(ROWS)}")
    p.add_argument("--out", default="bench-cpu-speed")
    args = p.parse_args(argv)
    print(markdown(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
