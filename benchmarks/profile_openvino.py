"""Where an OpenVINO pass's time goes: each graph of an export as the OpenVINO backend runs it.

    python -m benchmarks.profile_openvino --export .bench-models/pbe-full-onnx-int8 --out bench-profile-openvino

Each graph — the int8 OpenVINO IR where the export has one, else its ONNX graph — is compiled for the CPU with
composekit's settings (latency hint, bf16 where the CPU has it, else f32; static shapes: batch 2 for the U-Net
passes, as classifier-free guidance runs them, batch 1 for the rest) and OpenVINO's performance counters on.
One warm-up, then ``--repeats`` calls: the median wall time, and the last call's counters summed by what the
time went to: **attention's core** (every node directly inside an attention module — a transformer block's
``attn1``/``attn2``, the VAE's mid-block attention, CLIP's ``self_attn`` — except its projections and norms:
the score and value products, the softmax between them, which OpenVINO fuses into one subgraph, and the
reshapes around them), convolutions, fully connected layers (the projections and feed-forward layers), and the rest;
and attention's core again by the kernel that ran each part (``jit_avx512_i8``, ``jit_avx512_bf16``, ...: which
number format it computed in). ``--graphs`` profiles only the graphs named.

``--int8-float-graphs``: the graphs the export keeps in float (the VAE encoder and decoder) are also quantized
with NNCF (``nncf.quantize``, preset MIXED, three random calibration inputs) and timed the same way: the speed
an int8 VAE would have. Only the speed: random weights and random calibration say nothing about its error.

Not a unit test and not a ratio against a peer: a profile, to decide where a speed-up could come from.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .harness import cpu_description, cpu_label, openvino_precision, report

GRAPHS = {"unet": 2, "unet_shallow": 2, "object_encoder": 1, "vae_encoder": 1, "vae_decoder": 1}  # name -> batch
FLOAT_GRAPHS = ("vae_encoder", "vae_decoder")
# Directly inside an attention module (a transformer block's attn1/attn2, a VAE mid-block's attentions.N, CLIP's
# self_attn), but not its projections or norms: the score and value products, the softmax, the reshapes around them.
ATTENTION_CORE = re.compile(r"/(attn\d|attentions\.\d+|self_attn)/"
                            r"(?!to_|[qkv]_proj|out_proj|group_norm|norm|proj_in|proj_out|transformer_blocks)")


def _kind(node_name: str, node_type: str) -> str:
    if ATTENTION_CORE.search(node_name):
        return "attention core"
    if node_type.startswith("Convolution"):
        return "convolution"
    if node_type.startswith("FullyConnected"):
        return "fully connected"
    return "other"


def _inputs(spec: Any, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in spec.inputs:
        shape = [batch if d == "B" else d for d in t.shape]
        out[t.name] = np.full(shape, 500, np.int64) if t.dtype == "int64" else \
            rng.standard_normal(shape).astype(np.float32)
    return out


def _profile(core: Any, model: Any, feeds: dict[str, np.ndarray], precision: str, repeats: int) -> dict[str, Any]:
    model.reshape({name: list(a.shape) for name, a in feeds.items()})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer(feeds)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - start)
    kinds: dict[str, float] = {}
    attention: dict[str, float] = {}  # attention's core by the kernel that ran it (its number format shows)
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            kind = _kind(info.node_name, info.node_type)
            kinds[kind] = kinds.get(kind, 0.0) + info.real_time.total_seconds()
            if kind == "attention core":
                attention[info.exec_type] = attention.get(info.exec_type, 0.0) + info.real_time.total_seconds()
    counted = sum(kinds.values())
    return {"median_s": statistics.median(times), "times_s": times, "counted_s": counted,
            "share": {k: v / counted for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "attention_core_s_by_kernel": dict(sorted(attention.items(), key=lambda kv: -kv[1]))}


def _quantized(core: Any, path: Path, feeds: dict[str, np.ndarray], rng: np.random.Generator) -> Any:
    import nncf

    samples = [feeds] + [{k: (v if v.dtype == np.int64 else rng.standard_normal(v.shape).astype(np.float32))
                          for k, v in feeds.items()} for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(core.read_model(str(path)), nncf.Dataset(samples),
                             preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import openvino as ov

    from composekit.backends.openvino_backend import graph_path, read_graph
    from composekit.formats.export_manifest import read_manifest

    manifest = read_manifest(args.export)
    specs = manifest.specs()
    core = ov.Core()
    cpu = cpu_description()
    precision = openvino_precision()
    rng = np.random.default_rng(0)
    rows: dict[str, Any] = {}
    for name, batch in GRAPHS.items():
        if not manifest.has(name) or (args.graphs and name not in args.graphs):
            continue
        path = graph_path(manifest, name)
        feeds = _inputs(specs[name], batch, rng)
        rows[name] = {"file": path.name, "batch": batch,
                      **_profile(core, read_graph(core, manifest, name, path), feeds, precision, args.repeats)}
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        if args.int8_float_graphs and name in FLOAT_GRAPHS and path.suffix != ".xml":
            key = f"{name}, int8 (NNCF, random calibration)"
            rows[key] = {"file": f"{path.name} quantized here", "batch": batch,
                         **_profile(core, _quantized(core, path, feeds, rng), feeds, precision, args.repeats)}
            rows[key]["speedup_vs_float"] = rows[name]["median_s"] / rows[key]["median_s"]
            print(f"{key}: {rows[key]}", file=sys.stderr, flush=True)
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(sys.argv),
            "machine": cpu, "openvino": ov.__version__, "export": str(args.export),
            "int8_export": bool(manifest.data.get("int8")), "precision": precision, "repeats": args.repeats,
            "rows": rows}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    kinds = ("attention core", "convolution", "fully connected", "other")
    header = (f"Machine: {m['model']}, class {cpu_label(m)}, {m['cores']} cores; OpenVINO {r['openvino']}, "
              f"{r['precision']}; {r['date']}; `{r['command']}`")
    lines = [header, "",
             "| graph | file | batch | pass (median) | " + " | ".join(kinds) + " |",
             "|---|---|---|---|" + "---|" * len(kinds)]
    for name, row in r["rows"].items():
        speed = f" ({row['speedup_vs_float']:.2f}x float)" if "speedup_vs_float" in row else ""
        shares = " | ".join(f"{100 * row['share'].get(k, 0.0):.0f}%" for k in kinds)
        lines.append(f"| {name} | {row['file']} | {row['batch']} | {row['median_s']:.3f} s{speed} | {shares} |")
    lines += ["", "Attention's core by kernel (seconds of the last call):", ""]
    for name, row in r["rows"].items():
        split = ", ".join(f"{k} {v:.3f} s" for k, v in row.get("attention_core_s_by_kernel", {}).items())
        lines.append(f"- {name}: {split or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="an export directory (composekit-export onnx, with or without "
                                                   "--int8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int8-float-graphs", action="store_true",
                   help="also time the VAE encoder and decoder quantized with NNCF (speed only)")
    p.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS), help="profile only these graphs (default: all)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    result = run(args)
    report(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
