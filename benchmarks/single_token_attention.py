"""What the single-token cross-attention shortcut saves per U-Net pass, against the full attention, same run.

    python -m benchmarks.single_token_attention --model .bench-models/pbe-full \
        --exports .bench-models/pbe-full-onnx-int8-before .bench-models/pbe-full-onnx-int8 --out bench-single-token

Paint by Example's U-Net attends to one context token; composekit computes those cross-attentions as one
projected row broadcast to every query (composekit.backends.single_token_attention), diffusers computes the
attention. Timed interleaved, call by call, one warm-up each, median of ``--repeats``, at the guided batch (2):

- torch (the model's dtype, ``--dtype``): diffusers' ``UNet2DConditionModel`` with its own processors against the
  same module with the shortcut installed; and the largest difference of their noise predictions.
- ``--exports BEFORE AFTER``: two exports of the same model, one traced before the shortcut and one with it (their
  manifests say which), each U-Net graph (full and shallow) compiled as the OpenVINO backend compiles it (the int8
  IR where the export has one; bf16 where the CPU has it, else f32); and the largest difference between them.

The ratio is the figure: both sides run in the same process on the same inputs, one call after the other.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .harness import cpu_description, cpu_label, interleaved, openvino_precision, rel_diff, report
from .profile_openvino import _inputs

FULL, SHORTCUT = "diffusers' attention", "single-token shortcut"  # the torch row's two sides


def _torch_row(model: Path, dtype: str, repeats: int) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    from composekit.backends.single_token_attention import apply

    torch_dtype = getattr(torch, dtype)
    plain = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch_dtype).eval()
    fast = copy.deepcopy(plain)
    changed = apply(fast)
    cfg = plain.config
    g = torch.Generator().manual_seed(0)
    side = cfg.sample_size
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(torch_dtype)
    context = torch.randn(2, 1, cfg.cross_attention_dim, generator=g).to(torch_dtype)
    t = torch.tensor([500, 500])

    def call(unet: Any) -> Any:
        def run() -> np.ndarray:
            with torch.no_grad():
                return unet(x, t, context).sample.float().numpy()
        return run

    times, out = interleaved({FULL: call(plain), SHORTCUT: call(fast)}, repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"median_s": med, "times_s": times, "dtype": dtype, "cross_attentions": changed,
            "speedup": med[FULL] / med[SHORTCUT], "rel_diff": rel_diff(out[SHORTCUT], out[FULL])}


def _caller(request: Any, feeds: dict[str, np.ndarray]) -> Any:
    return lambda: request.infer(feeds)[0].copy()


def _openvino_rows(before: Path, after: Path, repeats: int) -> dict[str, Any]:
    import openvino as ov

    from composekit.backends.openvino_backend import graph_path, read_graph
    from composekit.formats.export_manifest import read_manifest

    core = ov.Core()
    precision = openvino_precision()
    manifests = {"before": read_manifest(before), "after": read_manifest(after)}
    rng = np.random.default_rng(0)
    rows: dict[str, Any] = {"precision": precision,
                            "exports": {k: {"path": str(m.root), "single_token_cross_attention":
                                            m.single_token_cross_attention, "int8": bool(m.int8)}
                                        for k, m in manifests.items()}}
    for name in ("unet", "unet_shallow"):
        if not all(m.has(name) for m in manifests.values()):
            continue
        feeds = _inputs(manifests["after"].specs()[name], 2, rng)
        calls = {}
        for key, m in manifests.items():
            path = graph_path(m, name)
            model = read_graph(core, m, name, path)
            model.reshape({k: list(a.shape) for k, a in feeds.items()})
            request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                        "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            calls[key] = _caller(request, feeds)
            rows.setdefault(name, {}).setdefault("files", {})[key] = path.name
        times, out = interleaved(calls, repeats)
        med = {key: statistics.median(t) for key, t in times.items()}
        rows[name].update(median_s=med, times_s=times, speedup=med["before"] / med["after"],
                          rel_diff=rel_diff(out["after"], out["before"]))
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "command": " ".join(sys.argv), "machine": cpu_description(), "repeats": args.repeats,
                              "model": str(args.model)}
    if args.model is not None:
        result["torch"] = _torch_row(Path(args.model), args.dtype, args.repeats)
        print(f"torch: {result['torch']}", file=sys.stderr, flush=True)
    if args.exports:
        result["openvino"] = _openvino_rows(Path(args.exports[0]), Path(args.exports[1]), args.repeats)
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [(f"Machine: {m['model']} (class {cpu_label(m)}), {m['cores']} cores; {r['date']}; `{r['command']}`; "
              f"interleaved, median of {r['repeats']} after one warm-up, guided batch 2."), "",
             "| runtime | graph | full attention | single-token shortcut | speed-up | largest difference (relative) |",
             "|---|---|---|---|---|---|"]
    if "torch" in r:
        t = r["torch"]
        med = t["median_s"]
        lines.append(f"| torch {t['dtype']} | U-Net ({t['cross_attentions']} cross-attentions) | "
                     f"{med[FULL]:.3f} s | {med[SHORTCUT]:.3f} s | "
                     f"{t['speedup']:.3f}x | {t['rel_diff']:.1e} |")
    ov = r.get("openvino", {})
    for name in ("unet", "unet_shallow"):
        if name in ov:
            row = ov[name]
            lines.append(f"| OpenVINO {ov['precision']} | {name} ({row['files']['after']}) | {row['median_s']['before']:.3f} s | "
                         f"{row['median_s']['after']:.3f} s | {row['speedup']:.3f}x | {row['rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_token_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a Paint-by-Example model directory (the torch rows)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--exports", nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                   help="two exports of that model: traced without and with the shortcut (the OpenVINO rows)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.model is None and not args.exports:
        p.error("give --model, --exports or both")
    if args.repeats < 1:
        p.error("--repeats must be positive")
    result = run(args)
    report(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
