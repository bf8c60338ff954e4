"""Throughput of batched compositing: images per second at batch sizes 1, 2, 4, 8 (``paste_batch``).

    python -m benchmarks.throughput --size full --steps 2 --batch-sizes 1 2 4 8 --out bench-throughput
    python -m benchmarks.throughput --size full --device cuda --dtype float16 --steps 25 \
        --batch-sizes 1 2 4 8 16 --out bench-throughput-gpu          # the GPU run (not run by the project)

For each batch size B, after one warm-up batch, ``--repeats`` batches of B independent jobs (each
its own background, object and seed, 512 x 512 for the full model) go through
``Compositor.paste_batch(jobs, batch_size=B)``: one object-encoder call, one VAE encode, one U-Net
call per step at batch 2B (guidance 5) and one decode for the batch. Reported: images per second
(B / median batch time), the speed-up over B = 1 measured in the same run, and the batch's stage
times. Random weights of the real dimensions (latency does not depend on weight values). Writes
``throughput.json`` and ``throughput.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from composekit import Compositor, __version__


def _jobs(n: int, size: int, offset: int) -> list[dict]:
    rng = np.random.default_rng(offset)
    q = size // 4
    return [{"object": rng.integers(0, 256, (200, 160, 3), dtype=np.uint8),
             "background": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "box": (q, q, 3 * q, 3 * q), "seed": offset + i} for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--models", default=".bench-models", help="where random models are cached")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench-throughput")
    args = p.parse_args(argv)

    import torch

    from composekit.apps.random_models import make_random_model

    model_dir = Path(args.models) / f"pbe-{args.size}"
    if not (model_dir / "model_index.json").exists():
        make_random_model(model_dir, args.size, seed=0, overwrite=True)
    comp = Compositor.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
    size = comp.backend.info.model_size
    rows = []
    comp.paste_batch(_jobs(1, size, 10_000), batch_size=1, steps=1, guidance=args.guidance)  # warm-up
    for b in args.batch_sizes:
        times, stages = [], []
        for r in range(args.repeats):
            jobs = _jobs(b, size, 100 * b + r)
            start = time.perf_counter()
            results = comp.paste_batch(jobs, batch_size=b, steps=args.steps, guidance=args.guidance)
            times.append(time.perf_counter() - start)
            bad = [x for x in results if not hasattr(x, "image")]
            if bad:
                raise SystemExit(f"batch of {b} failed: {bad[0]}")
            stages.append({k: v for k, v in results[0].timings.items()})
        median = statistics.median(times)
        rows.append({"batch_size": b, "batch_seconds": times, "images_per_second": b / median,
                     "seconds_per_image": median / b,
                     "stages": {k: statistics.median(s[k] for s in stages) for k in stages[0]}})
        print(f"B={b}: {b / median:.4f} images/s ({median:.1f} s per batch)", flush=True)
    base = rows[0]["images_per_second"]
    for row in rows:
        row["speedup_vs_first"] = row["images_per_second"] / base
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "composekit": __version__, "backend": comp.backend.describe(), "size": args.size, "steps": args.steps,
        "guidance": args.guidance, "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Throughput, {args.size} random model, {args.steps} steps, guidance {args.guidance}, "
             f"{report['backend']} ({report['date']})", "",
             "| batch size | images/s | s per image | vs batch 1 | encode_object | encode_image | denoise | decode |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        st = row["stages"]
        lines.append(f"| {row['batch_size']} | {row['images_per_second']:.3g} | {row['seconds_per_image']:.3g} | "
                     f"{row['speedup_vs_first']:.2f}x | {st.get('encode_object', 0):.3g} | "
                     f"{st.get('encode_image', 0):.3g} | {st.get('denoise', 0):.3g} | {st.get('decode', 0):.3g} |")
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
