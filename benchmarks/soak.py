"""A bounded soak of ``composekit serve``: many clients, good and bad requests mixed, every answer checked.

    python -m benchmarks.soak --requests 2000 --clients 8 --out bench-soak      # tiny random model, ~5 min

One server process (``composekit serve`` on a free loopback port, the tiny random model unless ``--model``
says otherwise) and ``--clients`` threads sending ``--requests`` requests in all, cycling through a fixed mix:

- good composites (seeds 0..7, 2 steps): each answer must be 200 and decode to exactly the pixels the
  library gives for the same request (computed in this process from the same model);
- bad ones, each with the status it must get: a malformed box (400), a file that is not an image (415), a
  box outside the background (422), a header-only PNG of 40,000 x 40,000 pixels (413, decoded never), an
  Accept header that excludes every image type (406), an unknown path (404), a wrong method (405).

Recorded: answers by status, mismatches (wrong status or wrong pixels: must be 0), requests per second, the
server's resident memory (RSS) after a warm-up, every 10% of the run and at the end, and its peak. The
figure that matters is RSS at the end against the start (flat = nothing accumulates per request).
Machine, command and date are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .harness import cpu_description, report
from .http_payloads import header_only_png, multipart_form

BOX = (10, 10, 60, 70)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _call(url: str, method: str = "POST", fields: dict | None = None, files: dict | None = None,
          headers: dict | None = None) -> tuple[int, bytes]:
    data, ctype = multipart_form(fields or {}, files or {}) if (fields or files) else (None, None)
    hdrs = dict(headers or {})
    if ctype:
        hdrs["Content-Type"] = ctype
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _rss(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="composekit-soak-") as scratch:  # the tiny model, removed afterwards
        return _run(args, Path(scratch))


def _run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from composekit import Compositor
    from composekit.apps.random_models import make_random_model

    model = Path(args.model) if args.model else make_random_model(scratch / "tiny", "tiny", seed=0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    bg = _png(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8))
    obj = _png(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    comp = Compositor.from_pretrained(model, device="cpu")
    expected = {s: np.asarray(comp.paste(obj, bg, BOX, seed=s, steps=2, progress=False).image) for s in range(8)}
    del comp
    box = ",".join(map(str, BOX))
    good = {"box": box, "steps": 2}
    bad = [  # (name, method, path, fields, files, headers, status)
        ("malformed box", "POST", "/v1/paste", {"box": "1,2,3"}, {"object": obj, "background": bg}, None, 400),
        ("not an image", "POST", "/v1/paste", good, {"object": b"%PDF-1.4", "background": bg}, None, 415),
        ("box outside", "POST", "/v1/paste", {**good, "box": "10,10,600,70"}, {"object": obj, "background": bg},
         None, 422),
        ("pixel bomb", "POST", "/v1/paste", good, {"object": obj, "background": header_only_png(40_000, 40_000)},
         None, 413),
        ("nothing acceptable", "POST", "/v1/paste", good, {"object": obj, "background": bg},
         {"Accept": "image/png;q=0, image/jpeg;q=0, image/webp;q=0"}, 406),
        ("unknown path", "GET", "/nowhere", None, None, None, 404),
        ("wrong method", "GET", "/v1/paste", None, None, None, 405),
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "composekit", "serve", "--model", str(model), "--device", "cpu",
                               "--port", str(port), "--queue-size", str(max(64, 4 * args.clients))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if "listening on" in line:
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep the pipe drained
        for s in range(8):  # warm-up: one of each seed
            _call(url + "/v1/paste", fields={**good, "seed": s}, files={"object": obj, "background": bg})
        memory = [{"after": 0, **_rss(server.pid)}]
        counts: Counter[str] = Counter()
        mismatches: list[str] = []
        lock = threading.Lock()
        done = [0]
        every = max(args.requests // 10, 1)

        def one(i: int) -> None:
            kind = i % (8 + len(bad))
            if kind < 8:  # a good composite, seed = kind
                status, body = _call(url + "/v1/paste", fields={**good, "seed": kind},
                                     files={"object": obj, "background": bg})
                ok = status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), expected[kind])
                name = f"good seed {kind}"
            else:
                name, method, path, fields, files, headers, want = bad[kind - 8]
                status, body = _call(url + path, method, fields, files, headers)
                ok = status == want and "error" in json.loads(body)
            with lock:
                counts[str(status)] += 1
                if not ok:
                    mismatches.append(f"request {i} ({name}): {status} {body[:200]!r}")
                done[0] += 1
                if done[0] % every == 0:
                    memory.append({"after": done[0], **_rss(server.pid)})

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - start
        if memory[-1]["after"] != args.requests:
            memory.append({"after": args.requests, **_rss(server.pid)})
        alive = _call(url + "/healthz", "GET")[0] == 200
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "command": "python -m benchmarks.soak " + " ".join(sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_description(),
        "model": "tiny random model" if not args.model else str(args.model),
        "requests": args.requests, "clients": args.clients, "seconds": round(seconds, 2),
        "requests_per_second": round(args.requests / seconds, 1), "answers": dict(sorted(counts.items())),
        "mismatches": len(mismatches), "first_mismatches": mismatches[:10], "healthy_after": alive,
        "rss_mb": memory, "rss_start_mb": memory[0]["VmRSS"], "rss_end_mb": memory[-1]["VmRSS"],
        "rss_peak_mb": memory[-1]["VmHWM"],
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [f"`{r['command']}` — {r['date']}, {r['machine'].get('class', '')} ({r['machine'].get('model', '')}), "
             f"{r['model']}", "",
             "| requests | clients | seconds | requests/s | answers | mismatches | RSS start -> end (peak), MB |",
             "|---|---|---|---|---|---|---|",
             f"| {r['requests']} | {r['clients']} | {r['seconds']} | {r['requests_per_second']} | "
             + ", ".join(f"{k}: {v}" for k, v in r["answers"].items())
             + f" | {r['mismatches']} | {r['rss_start_mb']} -> {r['rss_end_mb']} ({r['rss_peak_mb']}) |", "",
             "RSS after every 10% of the requests (MB): " + ", ".join(str(m["VmRSS"]) for m in r["rss_mb"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--model", default=None, help="model directory (default: a tiny random model)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        parser.error("reads the server's memory from /proc: Linux only")
    result = run(args)
    report(result, markdown(result), args.out)
    return 0 if result["mismatches"] == 0 and result["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
