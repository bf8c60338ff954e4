"""Latency of the weights-free classic method on a 12-megapixel background.

    python -m benchmarks.classic [--repeats 10] [--width 4000 --height 3000]

Uses scikit-image's ``coffee`` photograph as the object (elliptical cut-out) and its ``astronaut``
photograph resized to the background size (falls back to random pixels without scikit-image).
Prints the median, min and max over the repeats after one warm-up, as Markdown.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from PIL import Image

from composekit import Compositor
from composekit.apps.demo import demo_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.classic")
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    background, obj, source = demo_images()
    bg = np.asarray(background.resize((args.width, args.height), Image.Resampling.BICUBIC))
    w, h = args.width, args.height
    box = (int(w * 0.55), int(h * 0.35), int(w * 0.8), int(h * 0.7))
    comp = Compositor()
    for kind, image in (("numpy", bg), ("PIL", Image.fromarray(bg))):
        comp.paste(obj, image, box)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            comp.paste(obj, image, box)
            times.append(time.perf_counter() - start)
        print(f"| classic, {w}x{h} {kind} background, box {box[2] - box[0]}x{box[3] - box[1]} | "
              f"median {statistics.median(times) * 1000:.0f} ms | min {min(times) * 1000:.0f} ms | "
              f"max {max(times) * 1000:.0f} ms | n={len(times)} | {platform.processor() or platform.machine()} | "
              f"{source} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
