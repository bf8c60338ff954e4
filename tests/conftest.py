"""Shared fixtures: one tiny random model per test session, built with composekit's own builder."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the torch extra is needed for model tests")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Compiled-model caches (OpenVINO) go to a folder of this test run, not the user's cache."""
    import os

    os.environ.setdefault("COMPOSEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from composekit.apps.random_models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model_dir):
    """Tiny ONNX exports of both families: family -> (source model dir, export dir). Read-only: copy to mutate."""
    from composekit_export.onnx_export import export_onnx

    from composekit.apps.random_models import make_random_model

    root = tmp_path_factory.mktemp("exports")
    os_model = make_random_model(root / "os-src", "tiny", family="objectstitch", adaptor="conv1d", seed=4)
    out = {"paint_by_example": (tiny_model_dir, root / "pbe"), "objectstitch": (os_model, root / "os")}
    for src, dst in out.values():
        export_onnx(src, dst)
    return out


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory, tiny_model_dir):
    """The tiny Paint-by-Example model exported with ``int8=True`` (NNCF). Read-only: copy to mutate."""
    pytest.importorskip("nncf", reason="the int8 extra (NNCF) quantizes the U-Net graphs")
    from composekit_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("int8") / "pbe-int8"
    export_onnx(tiny_model_dir, out, int8=True)
    return out


def run_in_threads(fn, args) -> list:
    """``fn(arg)`` for each of ``args``, each in its own thread started together; the results in order.
    An exception in any thread fails the test."""
    import threading

    results, errors = [None] * len(args), []

    def work(i):
        try:
            results[i] = fn(args[i])
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.fixture(scope="session")
def compositor(tiny_model_dir):
    from composekit import Compositor

    return Compositor.from_pretrained(tiny_model_dir, device="cpu")


def gradient_background(width: int, height: int) -> Image.Image:
    """A smooth, non-constant RGB background of any size."""
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 7) % 256], axis=-1
    )
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def noise_object(width: int = 70, height: int = 90, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def assert_batch_matches_one_by_one(comp, jobs, results, **options):
    """Each successful batch result equals the job's own paste (images within 1/255, background exact)."""
    for job, r in zip(jobs, results):
        if isinstance(r, Exception):
            continue
        one = comp.paste(job["object"], job["background"], job["box"], seed=job["seed"], progress=False, **options)
        assert np.abs(np.asarray(one.image, np.int16) - np.asarray(r.image, np.int16)).max() <= 1
        np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(job["background"])[~r.mask])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def composekit_process(command: str, port: int, *args, env=None, wait_s: float = 180):
    """Run `composekit COMMAND --port PORT ARGS...` until it says "listening on"; yield the process (its stderr
    lines so far in ``proc.log_lines``); stop it afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "composekit", command, "--port", str(port), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    proc.log_lines = lines
    try:
        if not ready.wait(wait_s):
            raise AssertionError(f"composekit {command} did not start: {''.join(lines)}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
