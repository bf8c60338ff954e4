"""What a newcomer met: hints for the usual mistakes, warnings where a result may surprise, early refusals."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from composekit import BackendUnavailableError, Compositor, InputError


def test_a_box_given_as_x_y_width_height_gets_a_hint():
    bg, obj = np.zeros((40, 50, 3), np.uint8), np.full((10, 10, 3), 200, np.uint8)
    with pytest.raises(InputError, match=r"if these are \(x, y, width, height\), the box is \(30, 10, 45, 30\)"):
        Compositor().paste(obj, bg, (30, 10, 15, 20))  # corners inverted; as x, y, w, h it fits
    with pytest.raises(InputError) as info:
        Compositor().paste(obj, bg, (0, 0, 60, 60))  # too big either way: no such hint
    assert "width, height" not in str(info.value)


def test_swapped_object_and_background_get_a_hint():
    big, small = np.zeros((200, 200, 3), np.uint8), np.full((50, 50, 3), 90, np.uint8)
    with pytest.raises(InputError, match="are the object and the background swapped"):
        Compositor().paste(big, small, (60, 60, 150, 150))


def test_an_object_without_alpha_warns_that_its_rectangle_is_pasted(caplog):
    bg, obj = np.zeros((40, 50, 3), np.uint8), np.full((10, 10, 3), 200, np.uint8)
    with caplog.at_level(logging.WARNING, logger="composekit"):
        Compositor().paste(obj, bg, (5, 5, 30, 30))
    assert any("no alpha channel" in r.message for r in caplog.records)
    caplog.clear()
    cutout = np.dstack([obj, np.full((10, 10), 255, np.uint8)])
    with caplog.at_level(logging.WARNING, logger="composekit"):
        Compositor().paste(cutout, bg, (5, 5, 30, 30))
    assert not any("no alpha channel" in r.message for r in caplog.records)


def test_a_hub_id_without_torch_is_refused_before_any_download(monkeypatch):
    import importlib.util

    import composekit.compositor as compositor

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    monkeypatch.setattr(compositor, "resolve_source", lambda *a, **k: pytest.fail("a download was started"))
    with pytest.raises(BackendUnavailableError, match="needs diffusers"):
        Compositor.from_pretrained("someone/some-model")


def test_the_demo_says_how_to_install_torch_for_the_generative_method(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "composekit", "demo", str(tmp_path / "d")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pip install torch" in proc.stdout and ".[torch]" in proc.stdout
