"""Cost and numerical effect of doing less work: fewer DDIM steps and the guidance cut-off.

    python -m benchmarks.cutoff --model MODEL_DIR --reference 50 --configs 50:0.4 25:1.0 25:0.4 10:1.0 10:1.0:region

Each configuration is ``STEPS:GUIDANCE_END[:DECODE]`` (``guidance_end`` = fraction of the steps that
run classifier-free guidance, the rest run one conditional U-Net pass; ``DECODE`` = ``window`` or
``region``, see ``Compositor.paste``). For the reference
(``--reference`` steps, guidance on every step, the model's precision) and each configuration: the
end-to-end latency of one ``paste`` and the difference of the generated region from the
reference's (same seed, same initial noise). One warm-up call (1 step) runs first; each
configuration is timed once, so read small latency differences as noise.

On random weights only the cost and the numerical difference mean anything: visual quality cannot
be judged, and a difference of N/255 says nothing about whether a trained model's result is worse.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time

import numpy as np

from benchmarks.harness import cpu_description, cpu_label
from composekit import Compositor


def _config(text: str) -> tuple[int, float, str]:
    parts = text.split(":")
    try:
        steps, end, decode = int(parts[0]), float(parts[1]) if len(parts) > 1 else 1.0, parts[2] if len(parts) > 2 else "window"
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected STEPS:GUIDANCE_END[:DECODE] such as 25:0.4, got {text!r}") from None
    if decode not in ("window", "region") or len(parts) > 3:
        raise argparse.ArgumentTypeError(f"DECODE must be 'window' or 'region', got {text!r}")
    return steps, end, decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cutoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--reference", type=int, default=50, help="steps of the reference run (guidance on all steps)")
    p.add_argument("--configs", type=_config, nargs="+",
                   default=[(50, 0.4, "window"), (25, 1.0, "window"), (25, 0.4, "window"), (10, 1.0, "window")])
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    comp = Compositor.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    m = comp.backend.info.model_size
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (m, m, 3), dtype=np.uint8)
    obj = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    box = (m // 4, m // 4, 3 * m // 4, 3 * m // 4)
    comp.paste(obj, bg, box, steps=1, guidance=args.guidance, seed=0, progress=False)  # warm-up
    reference = None
    rows = []
    print(f"{comp!r}")
    machine = cpu_description() if args.device == "cpu" else None
    if machine is not None:
        print(f"CPU: {machine.get('model')}, {cpu_label(machine)}")
    print("| steps | guidance_end | decode | U-Net passes | end to end | decode stage | max abs diff vs reference "
          "(0..255) | mean abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    ref_config = (args.reference, 1.0, "window")
    for steps, end, decode in [ref_config] + [c for c in args.configs if c != ref_config]:
        start = time.perf_counter()
        r = comp.paste(obj, bg, box, steps=steps, guidance=args.guidance, guidance_end=end, decode=decode, seed=0,
                       progress=False)
        seconds = time.perf_counter() - start
        region = np.asarray(r.image, np.int16)[r.mask]
        if reference is None:
            reference = region
        diff = np.abs(region - reference)
        guided = int(np.ceil(end * steps))
        row = {"steps": steps, "guidance_end": end, "decode": decode, "unet_passes": 2 * guided + (steps - guided),
               "seconds": seconds, "decode_seconds": r.timings["decode"], "max_diff": int(diff.max()),
               "mean_diff": float(diff.mean())}
        rows.append(row)
        print(f"| {steps} | {end:g} | {decode} | {row['unet_passes']} | {seconds:.1f} s | {row['decode_seconds']:.1f} s | "
              f"{row['max_diff']} | {row['mean_diff']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks.cutoff " + " ".join(sys.argv[1:] if argv is None else argv),
                       "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "machine": machine, "model": args.model, "backend": comp.backend.describe(), "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
