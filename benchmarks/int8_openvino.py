"""Experiment: is NNCF's OpenVINO-native int8 U-Net faster than f32 on this CPU, where composekit's int8 export
(an ONNX graph with QuantizeLinear/DequantizeLinear pairs) is not?

    python -m benchmarks.int8_openvino --export .bench-models/pbe-full-onnx \\
        --int8-export .bench-models/pbe-full-onnx-int8 --out bench-int8-openvino      # ~30 min, full size, 2 cores

Three forms of the same exported U-Net (full pass and, where the export has one, the shallow pass of feature
caching), each compiled by OpenVINO for the CPU at the guided batch (2) with composekit's settings (latency
hint) at each inference precision of ``--precisions`` (f32, and bf16 where the CPU has it):

- ``f32``: the export's ``unet.onnx``;
- ``int8 QDQ (--int8)``: the graph ``composekit-export onnx --int8`` writes (NNCF on the ONNX graph);
- ``int8 OpenVINO-native``: ``nncf.quantize`` applied to the OpenVINO model read from ``unet.onnx``
  (the same preset, model type, overflow fix and calibration inputs as ``--int8``).

Calibration inputs are captured the way ``--int8`` captures them (``export/quantize.py``): every U-Net call
while the f32 export pastes the demo images. Timings: median of ``--repeats`` calls after one warm-up, the
three forms interleaved call by call (so a change in the machine's speed hits all three alike); the ratio is
against f32 in the same run. Error: the largest and mean relative difference of the noise prediction from
f32's on the calibration inputs. Machine, command and date are recorded beside the figures. Not a unit
test: the measurement that decided ``--int8`` should write an OpenVINO IR (it now does, with these settings).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .harness import cpu_description, interleaved, rel_diff, report


def _calibration(export: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    from composekit import Compositor
    from composekit_export.quantize import capture_calibration

    comp = Compositor.from_pretrained(export, backend="openvino", precision="f32", device="cpu")
    samples = capture_calibration(comp.backend.inner)
    del comp
    gc.collect()
    return samples


def _static(model: Any, sample: dict[str, np.ndarray]) -> Any:
    model.reshape({port.get_any_name(): list(sample[port.get_any_name()].shape) for port in model.inputs})
    return model


def _quantize(model: Any, samples: list[dict[str, np.ndarray]]) -> Any:
    """``nncf.quantize`` on an OpenVINO model with ``--int8``'s own settings."""
    import nncf

    from composekit_export.quantize import _settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(model, nncf.Dataset(samples), **_settings(nncf, samples))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import openvino as ov

    started = time.perf_counter()
    samples = _calibration(Path(args.export))
    core = ov.Core()
    capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    precisions = [p for p in args.precisions if p == "f32" or "BF16" in capabilities]
    graphs = {"unet": "unet.onnx", "unet_shallow": "unet_shallow.onnx"}
    results: dict[str, Any] = {}
    for name, file in graphs.items():
        if not samples.get(name) or not (Path(args.export) / file).exists():
            continue
        data = samples[name]
        t0 = time.perf_counter()
        native = _quantize(_static(core.read_model(str(Path(args.export) / file)), data[0]), data)
        quantize_s = time.perf_counter() - t0
        if args.save_ir:
            ov.save_model(native, str(Path(args.save_ir) / f"{name}.xml"), compress_to_fp16=False)
        # One compiled model per (graph form, inference precision); "f32" first: the reference and the peer.
        forms: dict[str, Any] = {}
        for precision in precisions:
            config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            suffix = "" if precision == "f32" else f" @{precision}"
            forms["f32" + suffix] = core.compile_model(
                _static(core.read_model(str(Path(args.export) / file)), data[0]), "CPU", config)
            if args.int8_export and (Path(args.int8_export) / file).exists():
                forms["int8 QDQ (--int8)" + suffix] = core.compile_model(
                    _static(core.read_model(str(Path(args.int8_export) / file)), data[0]), "CPU", config)
            forms["int8 OpenVINO-native" + suffix] = core.compile_model(native, "CPU", config)
        del native
        gc.collect()
        requests = {form: compiled.create_infer_request() for form, compiled in forms.items()}
        # Error against f32 on every calibration input.
        errors: dict[str, list[float]] = {form: [] for form in forms if form != "f32"}
        for inputs in data[: args.error_inputs]:
            ref = requests["f32"].infer(inputs)[0].copy()
            for form in errors:
                errors[form].append(rel_diff(requests[form].infer(inputs)[0], ref))
        # Interleaved timings on the first input (one warm-up each).
        times, _ = interleaved({form: (lambda r=request, x=data[0]: r.infer(x)) for form, request in requests.items()},
                               args.repeats)
        f32 = statistics.median(times["f32"])
        results[name] = {
            "batch": int(data[0]["sample"].shape[0]), "calibration_inputs": len(data), "quantize_s": round(quantize_s, 1),
            "forms": {form: {"median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3),
                             "max_s": round(max(ts), 3), "speedup_vs_f32": round(f32 / statistics.median(ts), 3),
                             **({"rel_err_max": round(max(errors[form]), 4),
                                 "rel_err_mean": round(float(np.mean(errors[form])), 4)} if form in errors else {})}
                      for form, ts in times.items()}}
        del requests, forms
        gc.collect()
    return {"command": "python -m benchmarks.int8_openvino " + " ".join(sys.argv[1:]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_description(),
            "openvino": ov.__version__, "repeats": args.repeats, "precisions": precisions, "graphs": results,
            "total_s": round(time.perf_counter() - started, 1)}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}` — {r['date']}, {m.get('class', '')} ({m.get('model', '')}), OpenVINO {r['openvino']}",
             "", "| graph | form | median s (min-max) | vs f32 | rel. error of eps vs f32 (max / mean) |",
             "|---|---|---|---|---|"]
    for name, g in r["graphs"].items():
        for form, f in g["forms"].items():
            err = f"{f['rel_err_max']} / {f['rel_err_mean']}" if "rel_err_max" in f else "-"
            lines.append(f"| {name} (batch {g['batch']}) | {form} | {f['median_s']} ({f['min_s']}-{f['max_s']}) | "
                         f"{f['speedup_vs_f32']}x | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_openvino", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an f32 export (composekit-export onnx)")
    parser.add_argument("--int8-export", default=None, help="the same model exported with --int8, to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--error-inputs", type=int, default=6, help="calibration inputs the error is measured on")
    parser.add_argument("--precisions", nargs="+", choices=["f32", "bf16"], default=["f32"],
                        help="OpenVINO inference precisions to compile each form at (bf16 only where the CPU has it)")
    parser.add_argument("--save-ir", default=None, help="folder to save the OpenVINO-native int8 IR in")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    report(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
