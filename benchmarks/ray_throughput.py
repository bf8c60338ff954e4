"""Images per second of ``composekit.apps.ray_batch.ray_batch`` with 1 and 2 workers, on one machine.

    python -m benchmarks.ray_throughput --images 32 --steps 4 --out bench-ray

Starts one local Ray cluster on 127.0.0.1 (not timed), then for the classic method and a tiny random model runs the
same job (``--images`` backgrounds, one object) with 1 and 2 workers, each into a fresh folder, timing the
whole ``ray_batch`` call (actor start-up and model loading included, as a user sees it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="bench-ray")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from composekit.apps.random_models import make_random_model
    from composekit.apps.ray_batch import _start_ray, ray_batch

    _start_ray(None)  # the local cluster's start-up is not part of any row

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(tmp / "obj.png")
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp / f"bg{i}.png")
        jobs = [{"object": str(tmp / "obj.png"), "background": str(tmp / f"bg{i}.png"), "box": (20, 20, 90, 100),
                 "seed": i} for i in range(args.images)]
        model = make_random_model(tmp / "tiny", "tiny", seed=0)
        for method, model_dir, options in (("classic", None, {}), ("tiny model", model, {"steps": args.steps})):
            for workers in args.workers:
                start = time.perf_counter()
                records = ray_batch(model_dir, jobs, tmp / f"out-{method}-{workers}", workers=workers, batch_size=4,
                                    load_options={"device": "cpu"} if model_dir else None, **options)
                seconds = time.perf_counter() - start
                ok = sum(r["status"] == "ok" for r in records)
                rows.append({"method": method, "workers": workers, "images": ok, "seconds": seconds,
                             "images_per_second": ok / seconds})
                print(f"{method:<10} workers={workers}: {ok} images in {seconds:.1f} s = {ok / seconds:.2f} images/s",
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_throughput.json").write_text(json.dumps({
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "steps": args.steps,
        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
