"""Cost and numerical effect of the classifier-free-guidance cut-off (``guidance_end``).

    python -m benchmarks.cutoff --model MODEL_DIR --steps 4 --ends 1.0 0.5 0.0

For each ``guidance_end``: end-to-end latency of one ``paste`` (after one warm-up call with the same
settings) and the difference of the generated region from the ``guidance_end=1.0`` result (same
seed and initial noise). On random weights only the cost and the numerical difference mean
anything; visual quality cannot be judged.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from composekit import Compositor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cutoff")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--ends", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    comp = Compositor.from_pretrained(args.model, device=args.device)
    m = comp.backend.info.model_size
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (m, m, 3), dtype=np.uint8)
    obj = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    box = (m // 4, m // 4, 3 * m // 4, 3 * m // 4)
    reference = None
    print(f"| guidance_end | {args.steps} steps, end to end | max abs diff vs 1.0 (0..255) | mean abs diff |")
    print("|---|---|---|---|")
    for end in [1.0] + [e for e in args.ends if e != 1.0]:
        kw = dict(steps=args.steps, guidance=args.guidance, guidance_end=end, seed=0, progress=False)
        comp.paste(obj, bg, box, **kw)  # warm-up
        start = time.perf_counter()
        r = comp.paste(obj, bg, box, **kw)
        seconds = time.perf_counter() - start
        region = np.asarray(r.image, np.int16)[r.mask]
        if reference is None:
            reference = region
        diff = np.abs(region - reference)
        print(f"| {end:g} | {seconds:.2f} s | {diff.max()} | {diff.mean():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
