"""`composekit serve` as a real process on 127.0.0.1 (a free port), spoken to over HTTP.

Traffic goes only to 127.0.0.1, bounded in count (at most 64 requests per load test) and time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import composekit_process, gradient_background, noise_object
from PIL import Image

from benchmarks.http_payloads import header_only_png, multipart_form as form
from composekit import Compositor

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

KEY = "test-key-0123456789"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


BG = _png(gradient_background(120, 90))
OBJ = _png(noise_object())
BOX = "10,10,60,70"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*args, env=None):
    """Start `composekit serve` on a free loopback port; yield (base url, process); stop it afterwards."""
    port = _free_port()
    with composekit_process("serve", port, *args, env=env, wait_s=120) as proc:
        yield f"http://127.0.0.1:{port}", proc


def call(url: str, path: str, fields=None, files=None, headers=None, method=None, timeout=120):
    """(status, headers, body) of one request; HTTP errors are returned, not raised."""
    data, ctype = form(fields or {}, files or {}) if (fields or files) else (None, None)
    hdrs = dict(headers or {})
    if ctype:
        hdrs["Content-Type"] = ctype
    req = urllib.request.Request(url + path, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def paste(url, seed, steps=2, headers=None, **extra):
    fields = {"box": BOX, "seed": seed, "steps": steps, **extra}
    return call(url, "/v1/paste", fields, {"object": OBJ, "background": BG}, headers)


def _array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _load(url, n, clients, expected, tolerance=0, seeded=True, **extra):
    """n requests from `clients` threads, seeds i % 8 (none when not `seeded`: the classic method draws no
    noise); every answer 200 and equal (within tolerance) to direct."""
    def one(i):
        return i, paste(url, i % 8 if seeded else "", **extra)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(n)))
    sizes = []
    for i, (status, headers, body) in answers:
        assert status == 200, body[:300]
        assert headers["x-composekit-seed"] == str(i % 8) if "x-composekit-seed" in headers else True
        diff = np.abs(_array(body).astype(np.int16) - expected[i % 8].astype(np.int16)).max()
        assert diff <= tolerance, (i, diff)
        sizes.append(int(headers.get("x-composekit-batch-size", 1)))
    return sizes


def _expected(comp, steps=2, **kw):
    return {s: np.asarray(comp.paste(OBJ, BG, tuple(map(int, BOX.split(","))), seed=s, steps=steps, progress=False,
                                     **kw).image) for s in range(8)}


def test_load_tiny_model_bit_identical_to_the_python_api(tiny_model_dir):
    expected = _expected(Compositor.from_pretrained(tiny_model_dir, device="cpu"))
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, _):
        sizes = _load(url, 64, 8, expected)
        assert set(sizes) == {1}  # micro-batching is off by default
        status, _, body = call(url, "/metrics")
        text = body.decode()
        assert 'composekit_requests_total{endpoint="/v1/paste",status="200"} 64.0' in text
        assert "composekit_request_seconds_count 64.0" in text and "composekit_queue_depth" in text
        status, headers, body = paste(url, 1, headers={"Accept": "image/webp;q=0.9, image/jpeg"})
        assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"


def test_load_classic_method_bit_identical():
    expected = {s: np.asarray(Compositor().paste(OBJ, BG, tuple(map(int, BOX.split(",")))).image) for s in range(8)}
    with serving() as (url, proc):
        _load(url, 64, 8, expected, seeded=False, steps="")
        status, _, body = paste(url, 3, steps="")  # a seed means nothing to the classic method: refused, not ignored
        assert status == 422 and b"seed applies to the generative method only" in body
        status, _, body = paste(url, "", steps=10)  # so is a model's option, with the Python API's message
        assert status == 422 and b"steps applies to the generative method only" in body
        for text in ("1_0", "\u0664\u0660", " 3 "):  # numbers are plain ASCII digits
            status, _, body = paste(url, "", context=text)
            assert status == 400 and b"context must be a number" in body, (text, body)
        deadline = time.monotonic() + 10  # one log line per request (the access log an operator expects)
        while sum("POST /v1/paste" in line for line in proc.log_lines) < 68 and time.monotonic() < deadline:
            time.sleep(0.1)
        logged = [line for line in proc.log_lines if "POST /v1/paste" in line]
        assert len(logged) >= 68 and any(" 200 " in line for line in logged) and any(" 422 " in line for line in logged)
        status, _, body = call(url, "/readyz")
        assert status == 200 and json.loads(body)["method"] == "classic"
        status, _, body = paste(url, 0, method="generative")  # no model on this server
        assert status == 422 and b"no model" in body


def test_micro_batching_within_paste_batch_tolerance(tiny_model_dir):
    # With feature caching (a form field from the option declarations): batched steps share full and shallow passes.
    expected = _expected(Compositor.from_pretrained(tiny_model_dir, device="cpu"), cache_interval=2)
    with serving("--model", tiny_model_dir, "--device", "cpu", "--max-batch", 4, "--max-wait-ms", 300) as (url, _):
        sizes = _load(url, 32, 8, expected, tolerance=1, cache_interval=2)
        assert max(sizes) > 1  # requests were composited together
        _, _, body = call(url, "/metrics")
        assert "composekit_batch_size_count" in body.decode()


MALFORMED = [
    ("missing background", {"box": BOX}, {"object": OBJ}, 400, "background"),
    ("box of three numbers", {"box": "1,2,3"}, None, 400, "four integers"),
    ("steps not a number", {"box": BOX, "steps": "many"}, None, 400, "steps must be an integer"),
    ("no box and no mask", {}, None, 400, "box"),
    ("box outside", {"box": "10,10,600,70"}, None, 422, "outside"),
    ("steps zero", {"box": BOX, "steps": "0"}, None, 422, "steps"),
    ("unknown method", {"box": BOX, "method": "magic"}, None, 422, "method"),
    ("fidelity too high", {"box": BOX, "fidelity": "7"}, None, 422, "fidelity"),
    ("not an image", {"box": BOX}, {"object": b"%PDF-1.4 hello", "background": BG}, 415, "not a readable image"),
    ("pixel bomb", {"box": BOX}, {"object": OBJ, "background": header_only_png(40_000, 40_000)}, 413, "pixels"),
    ("a path instead of a file", {"box": BOX, "object": "/etc/hostname"}, {"background": BG}, 400, "object"),
    ("upload over the limit", {"box": BOX}, {"object": OBJ, "background": b"\0" * (2 * 1024 * 1024)}, 413,
     "max-upload-mb"),
]


def test_malformed_requests_and_the_api_key(tiny_model_dir):
    auth = {"Authorization": f"Bearer {KEY}"}
    with serving("--model", tiny_model_dir, "--device", "cpu", "--max-upload-mb", 1, env={"COMPOSEKIT_API_KEY": KEY}) \
            as (url, _):
        for name, fields, files, code, text in MALFORMED:
            files = {"object": OBJ, "background": BG} if files is None else files
            status, headers, body = call(url, "/v1/paste", fields, files, auth)
            assert status == code, (name, status, body[:300])
            error = json.loads(body)["error"]
            assert text in error["message"] and error["type"], (name, error)
        # A field naming a model or a path on the server does nothing: the server's model answers.
        status, headers, _ = paste(url, 0, headers=auth, model="/etc", backend="onnxruntime")
        assert status == 200 and headers["x-composekit-method"] == "generative"
        assert call(url, "/healthz")[0] == 200  # still healthy after all of that
        # The key: every endpoint but /healthz and the API's description (the docs page loads the schema
        # before anyone can type a key into it).
        for path in ("/readyz", "/metrics"):
            assert call(url, path)[0] == 401, path
            assert call(url, path, headers={"Authorization": "Bearer wrong-key-000"})[0] == 401, path
            assert call(url, path, headers=auth)[0] == 200, path
        status, headers, body = paste(url, 0)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert call(url, "/docs")[0] == 200
        spec = json.loads(call(url, "/openapi.json")[2])
        assert "/v1/paste" in spec["paths"]
        schemes = spec["components"]["securitySchemes"]  # the docs page's "Authorize" sends the bearer key
        assert any(s.get("scheme") == "bearer" for s in schemes.values())
        assert spec["paths"]["/v1/paste"]["post"]["security"]


def test_queue_limit_and_timeout(tiny_model_dir):
    with serving("--model", tiny_model_dir, "--device", "cpu", "--queue-size", 1, "--timeout", 1) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: paste(url, i, steps=150), range(6)))
        codes = sorted(a[0] for a in answers)
        assert 503 in codes, codes  # queue full
        full = next(a for a in answers if a[0] == 503)
        assert full[1].get("retry-after") and json.loads(full[2])["error"]["type"] == "QueueFull"
        assert 504 in codes, codes  # over the 1 s timeout
        # Once the running composite finishes, the queued one (timed out) is dropped unrun and the server
        # answers again: polled with a deadline, not a fixed sleep (the worker's speed varies with the machine).
        deadline = time.monotonic() + 120
        while (status := paste(url, 0)[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status == 200


def test_sigterm_drains_in_flight_requests(tiny_model_dir):
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, proc):
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault("answer", paste(url, 3, steps=250)))
        slow.start()
        _wait_for(lambda: _taken(url) == 1)  # the slow request is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = paste(url, 1, timeout=10) if proc.poll() is None else None
        slow.join(120)
        assert result["answer"][0] == 200  # the in-flight request finished
        assert late is not None and late[0] == 503  # the listener stays open while draining: 503, not refused
        assert json.loads(late[2])["error"]["type"] == "ShuttingDown"
        # uvicorn re-raises the signal once it has shut down gracefully, so the status is -SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)


def test_red_team_findings_get_clear_bounded_answers(tiny_model_dir, tmp_path):
    # Findings of the service's red team (numbers as in its issue) that fail without the fixes.
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, _):
        # 2. eta above 1 is refused as input (422), not a 500 with a float16 hint on a float32 server.
        status, _, body = paste(url, 0, eta="1.01")
        assert status == 422 and b"eta must be a number in 0..1" in body, body
        # 5. FastAPI's and Starlette's own errors in the one envelope, counted.
        for method, path, code in (("GET", "/nowhere", 404), ("GET", "/v1/paste", 405)):
            status, _, body = call(url, path, method=method)
            assert status == code and json.loads(body)["error"]["type"] in ("NotFound", "MethodNotAllowed"), body
        req = urllib.request.Request(url + "/v1/paste", data=b"x", method="POST",
                                     headers={"Content-Type": "multipart/form-data"})  # no boundary
        try:
            urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        assert status == 400 and "error" in json.loads(body), body
        metrics = call(url, "/metrics")[2].decode()
        assert 'composekit_requests_total{endpoint="other",status="404"} 1.0' in metrics
        assert 'composekit_requests_total{endpoint="/v1/paste",status="405"} 1.0' in metrics
        # 8. Accept: q=0 excludes, types are case-insensitive, parameters may have spaces, q=inf is ignored.
        for accept, media in (("image/webp;q=0", "image/png"), ("IMAGE/JPEG", "image/jpeg"),
                              ("image/jpeg ; q=0.9", "image/jpeg"), ("image/webp;q=inf", "image/png")):
            status, headers, _ = paste(url, 0, headers={"Accept": accept})
            assert status == 200 and headers["content-type"] == media, (accept, headers["content-type"])
        status, _, body = paste(url, 0, headers={"Accept": "image/png;q=0, image/jpeg;q=0, image/webp;q=0"})
        assert status == 406 and json.loads(body)["error"]["type"] == "NotAcceptable"
        # 9. Bad input is not echoed back at length; numbers are plain ASCII digits.
        status, headers, body = paste(url, 0, box="1" * 1_000_000)
        assert status == 400 and len(body) < 1000, (status, len(body))
        status, headers, body = paste(url, "9" * 4000)
        assert status == 400 and len(body) < 1000 and not any("9" * 100 in v for v in headers.values())
        for text in ("\u0664\u0660", "1_0", " 3 "):
            status, _, body = paste(url, 0, steps=text)
            assert status == 400 and b"steps must be an integer" in body, (text, body)
        # 12. A truncated PNG is called truncated (415), not "malformed EXIF".
        status, _, body = call(url, "/v1/paste", {"box": BOX}, {"object": OBJ, "background": truncated})
        assert status == 415 and b"truncated" in body and b"EXIF" not in body, body


def _metric(url, prefix):
    text = call(url, "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _taken(url):
    """Composites the worker has started plus those waiting in the queue."""
    return _metric(url, "composekit_batch_size_count") + _metric(url, "composekit_queue_depth ")


def _wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def _abandoned(url):
    return _metric(url, "composekit_abandoned_total{")


def test_timed_out_requests_free_their_slots_at_once(tiny_model_dir):
    # Finding 3: with --queue-size 2 --timeout 2, three long requests time out (504); a request right after them
    # must be taken (their waiting slots are free, the running one stops between steps), not refused with 503.
    with serving("--model", tiny_model_dir, "--device", "cpu", "--queue-size", 2, "--timeout", 2) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = pool.submit(paste, url, 0, steps=900)
            _wait_for(lambda: _taken(url) == 1)  # the first is running; the next two wait in the two slots
            waiting = list(pool.map(lambda i: paste(url, i, steps=900), (1, 2)))
            codes = sorted([running.result()[0]] + [a[0] for a in waiting])
        assert codes == [504, 504, 504], codes
        status, _, body = paste(url, 0, steps=2)
        assert status == 200, body[:300]
        deadline = time.monotonic() + 30
        while _abandoned(url) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _abandoned(url) == 3  # two dropped while queued, one stopped while running


def test_a_client_that_leaves_does_not_cost_the_next_one(tiny_model_dir):
    # Finding 4: requests whose client disconnected are dropped (queued) or stopped between steps (running),
    # never computed to the end: after 4 abandoned long requests the server is free again.
    body, ctype = form({"box": BOX, "seed": 0, "steps": 900}, {"object": OBJ, "background": BG})
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        for k in range(4):
            _wait_for(lambda: _abandoned(url) == k)  # the earlier ones are all counted: nothing else moves
            taken = _taken(url)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /v1/paste HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + ctype.encode() +
                          b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                # the client goes away once the server has taken the request, before the answer
                _wait_for(lambda: _taken(url) > taken)
        deadline = time.monotonic() + 60
        while _abandoned(url) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _abandoned(url) == 4
        status, _, text = paste(url, 0, steps=2)
        assert status == 200, text[:300]
        metrics = call(url, "/metrics")[2].decode()
        assert 'composekit_requests_total{endpoint="/v1/paste",status="200"} 1.0' in metrics
        assert 'composekit_requests_total{endpoint="/v1/paste",status="499"} 4.0' in metrics  # counted as left


def _status(pid: int) -> dict[str, int]:
    """The server process's resident memory now and at its peak, in MB (Linux)."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def _big_png(side: int) -> bytes:
    """A real side x side RGB PNG that compresses to a few hundred kB (stripes)."""
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[::7] = 200
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc (Linux)")
def test_decoded_pixels_are_budgeted_per_request_and_in_flight(tiny_model_dir):
    # Finding 1: a 9000x9000 PNG of a few hundred kB decodes to ~1 GB. It is refused from its header, before any
    # pixel is decoded (the server's peak memory does not move); requests in flight share a budget.
    bomb = _big_png(9000)
    assert len(bomb) < 2_000_000
    medium = _png(gradient_background(1200, 1000))  # 1.2 megapixels
    with serving("--model", tiny_model_dir, "--device", "cpu", "--max-request-megapixels", 1.5,
                 "--max-inflight-megapixels", 2) as (url, proc):
        before = _status(proc.pid)
        status, _, body = call(url, "/v1/paste", {"box": BOX}, {"object": OBJ, "background": bomb})
        error = json.loads(body)["error"]
        assert status == 413 and error["type"] == "ImageTooLarge" and "--max-request-megapixels 1.5" in error["message"]
        assert "background 9000x9000" in error["message"], error
        assert _status(proc.pid)["VmHWM"] < before["VmHWM"] + 50  # nothing was decoded
        # One 1.2-megapixel request in flight holds the budget: a second one waits its turn (503, Retry-After).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, url, "/v1/paste", {"box": BOX, "seed": 0, "steps": 400},
                                {"object": OBJ, "background": medium})
            _wait_for(lambda: _taken(url) == 1)
            assert _metric(url, "composekit_decoded_megapixels ") == pytest.approx(1.2 + 70 * 90 / 1e6)
            status, headers, body = call(url, "/v1/paste", {"box": BOX, "steps": 2}, {"object": OBJ, "background": medium})
            assert status == 503 and headers.get("retry-after"), body
            error = json.loads(body)["error"]
            assert error["type"] == "Busy" and "--max-inflight-megapixels 2" in error["message"], error
            assert first.result()[0] == 200
        status, _, _ = call(url, "/v1/paste", {"box": BOX, "steps": 2}, {"object": OBJ, "background": medium})
        assert status == 200  # the budget was given back


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc (Linux)")
def test_large_images_decode_off_the_event_loop_and_memory_is_given_back(tiny_model_dir):
    # Finding 1: decoding and encoding ran on the event loop (/healthz stalled 7.5 s behind one large request),
    # and memory stayed near its peak afterwards. A 30-megapixel request (within the default budget).
    big = _big_png(5500)
    latencies: list[float] = []
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, proc):
        assert call(url, "/v1/paste", {"box": BOX, "seed": 0, "steps": 2}, {"object": OBJ, "background": BG})[0] == 200
        before = _status(proc.pid)
        done = threading.Event()

        def poll():
            while not done.is_set():
                start = time.perf_counter()
                assert call(url, "/healthz")[0] == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for seed in (0, 1):
                status, headers, body = call(url, "/v1/paste", {"box": BOX, "seed": seed, "steps": 2},
                                             {"object": OBJ, "background": big}, {"Accept": "image/webp"})
                assert status == 200 and Image.open(io.BytesIO(body)).size == (5500, 5500)
                assert headers["content-type"] == "image/webp"  # ~2 s to encode here: long enough to see a stall
        finally:
            done.set()
            poller.join()
        after = _status(proc.pid)
    # The two requests took seconds; /healthz was answered throughout (it stalled for seconds before the fix).
    assert len(latencies) > 10 and max(latencies) < 1.0, (len(latencies), max(latencies))
    assert after["VmHWM"] > before["VmRSS"] + 300  # the requests did make the server big...
    assert after["VmRSS"] < before["VmRSS"] + 150, (before, after)  # ...and it gave the memory back


def _raw(port: int, data: bytes, wait_s: float = 30) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes (or wait_s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_expect_100_continue_is_answered_before_any_body(tiny_model_dir):
    # Finding 6: with Expect: 100-continue the server sent "100 Continue" to a client with a wrong key and read up
    # to 80 MB before answering 401; with Content-Length 10^12 and no body it never answered.
    with serving("--model", tiny_model_dir, "--device", "cpu", "--api-key", KEY, "--max-upload-mb", 1) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /v1/paste HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n" \
               b"Expect: 100-continue\r\n"
        for extra, code in ((b"Authorization: Bearer wrong-key-000\r\nContent-Length: 31457280\r\n", b"401"),
                            (f"Authorization: Bearer {KEY}\r\nContent-Length: {10**12}\r\n".encode(), b"413"),
                            (f"Authorization: Bearer {KEY}\r\nContent-Length: 31457280\r\n".encode(), b"413")):
            start = time.monotonic()
            answer = _raw(port, head + extra + b"\r\n")  # headers only: the client waits for 100 Continue
            assert answer.startswith(b"HTTP/1.1 " + code), answer[:200]
            assert b"100 Continue" not in answer and b'"error"' in answer
            assert time.monotonic() - start < 20  # answered at once, the connection closed (not left open)
        # A request that will be taken is told to go on.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            body, ctype = form({"box": BOX, "seed": 0, "steps": 2}, {"object": OBJ, "background": BG})
            s.sendall(f"POST /v1/paste HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
            assert s.recv(64).startswith(b"HTTP/1.1 100 Continue")
            s.sendall(body)
            assert s.recv(64).startswith(b"HTTP/1.1 200")


def test_header_body_and_idle_timeouts(tiny_model_dir):
    # Finding 7: slow-header, slow-body and idle connections stayed open for the whole 30 s test.
    with serving("--model", tiny_model_dir, "--device", "cpu", "--header-timeout", 1.5, "--body-timeout", 1.5,
                 "--idle-timeout", 1) as (url, _):
        port = int(url.rsplit(":", 1)[1])

        def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bool, bytes]:
            """Whether the server closes ``sock`` within ``seconds`` while the client sends ``trickle`` a byte at
            a time (each 0.2 s); what it answered."""
            deadline, out, sent = time.monotonic() + seconds, b"", 0
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                if sent < len(trickle):
                    with contextlib.suppress(OSError):
                        sock.sendall(trickle[sent:sent + 1])
                    sent += 1
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    return True, out
                if not chunk:
                    return True, out
                out += chunk
            return False, out

        slow_headers = b"POST /v1/paste HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        with socket.create_connection(("127.0.0.1", port)) as idle, \
                socket.create_connection(("127.0.0.1", port)) as slow_head, \
                socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(b"POST /v1/paste HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                              b"Content-Length: 1000\r\n\r\n")
            # Normal clients are served meanwhile.
            assert paste(url, 0)[0] == 200
            results = {}
            threads = [threading.Thread(target=lambda k=k, s=s, t=t: results.setdefault(k, closed_within(s, 15, t)))
                       for k, s, t in (("idle", idle, b""), ("headers", slow_head, slow_headers),
                                       ("body", slow_body, b'--b\r\nContent-Disposition: form-data; name="box"'
                                                                   b"\r\n\r\n" + b"1" * 150))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert results["idle"][0] and results["headers"][0], results
        closed, answer = results["body"]
        assert closed and answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, results
        # A kept-alive connection that goes quiet after its answer is closed after --idle-timeout.
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            closed, answer = closed_within(s, 10)
            assert closed and answer.startswith(b"HTTP/1.1 200"), answer
        assert paste(url, 1)[0] == 200


def test_kill_9_mid_request_never_gives_a_truncated_200(tiny_model_dir):
    # Faults: the server killed while composing; the client gets a connection error, never a 200 with part of an
    # image.
    with serving("--model", tiny_model_dir, "--device", "cpu") as (url, proc):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(paste, url, 0, steps=600)
            _wait_for(lambda: _taken(url) == 1)
            proc.kill()
            proc.wait(30)
            with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
                answer.result(60)
