"""Is a paste as fast off the main thread as on it? Main thread against worker threads, quiet and loaded.

    python -m benchmarks.threads --out bench-threads             # tiny model, 150 steps, ~5 min on 2 cores

A service calls the model from a worker thread (``composekit serve``: one long-lived worker; Ray Serve:
``asyncio.to_thread``, a pool thread per call), a script from the main thread. Each row is one way of
calling ``paste`` — on the main thread, on one long-lived worker thread, on a fresh thread per call —
measured in its own fresh process (so no row inherits another's thread pools), quiet and beside a
controlled background load (one process spinning on one core). Figures: median and spread over
``--repeats`` pastes after one warm-up, and each row's ratio to the quiet main thread of the same setting.

Settings: ``default`` (what composekit does now) and ``--compare`` settings given as environment
assignments (e.g. ``OMP_WAIT_POLICY=ACTIVE`` to measure libgomp's spinning waits). Machine, command and date
are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .harness import cpu_description

MODES = ("main thread", "one worker thread", "a new thread per call")

_CHILD = r"""
import json, sys, threading, time
import numpy as np
from PIL import Image
from composekit import Compositor

model, steps, repeats, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
comp = Compositor.from_pretrained(model, device="cpu")
size = comp.backend.info.model_size
bg = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
obj = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 70, 3), dtype=np.uint8))
box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)

def paste():
    start = time.perf_counter()
    comp.paste(obj, bg, box, steps=steps, seed=0, progress=False)
    return time.perf_counter() - start

times = []
if mode == "main thread":
    times = [paste() for _ in range(repeats + 1)]
elif mode == "one worker thread":
    worker = threading.Thread(target=lambda: times.extend(paste() for _ in range(repeats + 1)))
    worker.start(); worker.join()
else:
    for _ in range(repeats + 1):
        t = threading.Thread(target=lambda: times.append(paste()))
        t.start(); t.join()
print(json.dumps(times[1:]))
"""

_SPIN = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"


def _row(model: str, steps: int, repeats: int, mode: str, env: dict[str, str], loaded: bool) -> dict[str, Any]:
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN]) if loaded else None
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, model, str(steps), str(repeats), mode],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: {proc.stderr[-2000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from composekit.apps.random_models import make_random_model

    model = Path(args.models) / f"pbe-{args.size}"
    if not (model / "model_index.json").exists():
        make_random_model(model, args.size, seed=0, overwrite=True)
    settings = {"default": {}}
    for text in args.compare or []:
        settings[text] = dict(item.split("=", 1) for item in text.split(","))
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "cpu": cpu_description(), "size": args.size, "steps": args.steps, "repeats": args.repeats, "rows": [],
    }
    for setting, env in settings.items():
        for loaded in (False, True):
            for mode in MODES:
                row = {"setting": setting, "load": "1 spinning process" if loaded else "quiet", "mode": mode,
                       **_row(str(model), args.steps, args.repeats, mode, env, loaded)}
                results["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    for row in results["rows"]:
        base = next(r for r in results["rows"] if r["setting"] == row["setting"] and r["load"] == "quiet"
                    and r["mode"] == "main thread")
        row["vs_quiet_main"] = row["median_s"] / base["median_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    lines = [f"CPU: {cpu['model']}, {cpu['class']}, {cpu['cores']} cores; random {results['size']} Paint-by-Example, "
             f"{results['steps']} steps; median (min-max) of {results['repeats']} pastes after one warm-up, each row "
             f"in a fresh process; {results['date']}; `{results['command']}`.", "",
             "| setting | load | called from | seconds, median (min-max) | x quiet main thread |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['setting']} | {r['load']} | {r['mode']} | {r['median_s']:.2f} ({r['min_s']:.2f}-"
                     f"{r['max_s']:.2f}) | {r['vs_quiet_main']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", nargs="*", metavar="VAR=VALUE[,VAR=VALUE]",
                   help="further settings, as environment assignments for the measured process")
    p.add_argument("--models", default=".bench-models")
    p.add_argument("--out", default="bench-threads")
    args = p.parse_args(argv)
    started = time.perf_counter()
    print(markdown(run(args)))
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
