"""Faults, with nothing lost: `composekit batch` killed with SIGKILL at several points (local and on Ray), then run
again; an output folder on a full disk (a 1 MB tmpfs where the machine allows mounting one, and an injected
ENOSPC everywhere). `kill -9` of `composekit serve` is in test_serve.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from PIL import Image

STEPS = 120  # a few tenths of a second per composite with the tiny model: time to be killed between and during


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-shots")
    for i in range(6):
        gradient_background(120 + 10 * i, 90).save(root / f"bg{i}.png")
    noise_object().save(root / "obj.png")
    return root


def _command(shots: Path, out: Path, model: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "composekit", "batch", str(shots / "obj.png"),
            *(str(shots / f"bg{i}.png") for i in range(6)), "--box", "10,10,60,70", "--model", str(model),
            "--steps", str(STEPS), "--device", "cpu", "--batch-size", "1", "--threads", "1", "-o", str(out), *extra]


def _finished(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("bg*.png"))


def _kill_when(command: list[str], out: Path, outputs: int, env=None) -> None:
    """Start ``command`` and SIGKILL it once ``outputs`` outputs exist (0: as soon as it has started working)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(_finished(out)) < outputs or (outputs == 0 and not out.exists()):
            assert proc.poll() is None, f"the batch ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _check_intact(out: Path, reference: Path) -> None:
    """Every file under a final name is a whole image equal to the uninterrupted run's."""
    for name in _finished(out):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name)))


def _check_resumed(out: Path, reference: Path, run: subprocess.CompletedProcess) -> list[dict]:
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert _finished(out) == [f"bg{i}.png" for i in range(6)]
    _check_intact(out, reference)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".manifest")]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [Path(r["output"]).name for r in records] == [f"bg{i}.png" for i in range(6)]
    for r in records:  # every row: written now, or written by a killed run whose journal kept its record
        assert r["status"] == "ok" or r["status"].startswith("skipped"), r
        assert r["seed"] == 0 and r["timings"], r
    return records


@pytest.fixture(scope="module")
def reference(shots, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    run = subprocess.run(_command(shots, out, tiny_model_dir), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out


def test_local_batch_killed_at_several_points_loses_nothing(shots, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "out"
    command = _command(shots, out, tiny_model_dir)
    for outputs in (0, 1, 3, 5):  # before any output, then after 1, 3 and 5 of 6
        _kill_when(command, out, outputs)
        _check_intact(out, reference)
        assert len(_finished(out)) >= outputs
    records = _check_resumed(out, reference, subprocess.run(command, capture_output=True, text=True, timeout=600))
    assert any(r["status"].startswith("skipped") for r in records)


def test_a_partial_file_left_by_a_kill_is_removed_by_the_next_run(shots, tiny_model_dir, reference, tmp_path):
    # SIGKILL while an image is being written leaves its temporary file (never a file under the final name);
    # the next run removes it. Planted here, since a kill lands inside a write only by chance.
    out = tmp_path / "out"
    out.mkdir()
    (out / ".bg2.png.x1y2z3.tmp").write_bytes(b"\x89PNG\r\n\x1a\n half an image")
    # A record whose output was never renamed into place (killed in between), then a line cut by the crash.
    (out / ".manifest.journal.jsonl").write_text('{"output": "bg4.png", "status": "ok", "seed": 99, "timings": {}}\n'
                                                 '{"output": "bg9.png", "status": "ok", "se')
    records = _check_resumed(out, reference, subprocess.run(_command(shots, out, tiny_model_dir),
                                                            capture_output=True, text=True, timeout=600))
    assert [r["status"] for r in records] == ["ok"] * 6  # every row ran: none had its output


def test_ray_batch_killed_at_several_points_loses_nothing(shots, tiny_model_dir, reference, tmp_path):
    pytest.importorskip("ray")
    from test_ray import LOOPBACK_ENV

    env = {**os.environ, **LOOPBACK_ENV}
    out = tmp_path / "out"
    command = _command(shots, out, tiny_model_dir, "--ray", "--workers", "1")
    for outputs in (1, 3):
        _kill_when(command, out, outputs, env)
        _wait_for_ray_to_stop(out)
        _check_intact(out, reference)
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    records = _check_resumed(out, reference, run)
    assert sum(r["status"] == "skipped" for r in records) >= 3


def _wait_for_ray_to_stop(out: Path, seconds: float = 60) -> None:
    """The killed driver's local Ray cluster goes down with it: no more outputs appear once it has."""
    deadline = time.monotonic() + seconds
    seen = _finished(out)
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _finished(out)
        if now == seen:
            return
        seen = now
    raise AssertionError("outputs kept appearing after the batch was killed")


def _tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``path`` (root on Linux); False when this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("where", ["local", "ray"])
def test_a_full_disk_gives_a_clear_error_and_nothing_partial(shots, tiny_model_dir, tmp_path, where):
    env = None
    if where == "ray":
        pytest.importorskip("ray")
        from test_ray import LOOPBACK_ENV

        env = {**os.environ, **LOOPBACK_ENV}
    out = tmp_path / "small"
    if not _tmpfs(out, "300k"):
        pytest.skip("mounting a tmpfs needs root on Linux; the injected ENOSPC test covers the same path")
    try:
        big = tmp_path / "big"
        big.mkdir()
        for i in range(6):  # noisy backgrounds: ~100 kB PNGs, so the 300 kB disk fills after a few
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(
                big / f"bg{i}.png")
        noise_object().save(big / "obj.png")
        ray = ["--ray", "--workers", "1"] if where == "ray" else []
        run = subprocess.run(_command(big, out, tiny_model_dir)[:-2] + ["--steps", "2", "-o", str(out), *ray],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no space left on its device" in run.stderr and "Traceback" not in run.stderr, run.stderr
        written = _finished(out)
        assert 0 < len(written) < 6, written
        for name in written:  # whatever is there is whole
            Image.open(out / name).load()
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


def test_injected_enospc_is_a_clear_output_error(tmp_path, monkeypatch):
    from composekit import OutputError
    from composekit.formats.atomic import save_image_atomic

    image = gradient_background(64, 48)
    target = tmp_path / "out.png"
    save_image_atomic(image, target)
    before = target.read_bytes()

    def half_then_full(self, f, format=None, **kw):  # the device fills up in the middle of the image
        f.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(OutputError, match="no space left on its device.*nothing was written"):
        save_image_atomic(image, target)
    assert target.read_bytes() == before  # the old content, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left
