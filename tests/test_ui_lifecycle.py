"""`composekit ui` stops cleanly on SIGTERM (as `kill`, systemd and `docker stop` send it) and leaves no
temporary folder behind; `build_app` without a folder given removes the one it made at the latest when the interpreter exits.
Needs Gradio only, no browser (tests/test_ui.py drives the app in Chromium)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import composekit_process, free_port

pytest.importorskip("gradio")


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("composekit-ui"))


def test_sigterm_stops_the_ui_and_removes_its_folder(tmp_path):
    env = {"TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with composekit_process("ui", free_port(), env=env) as proc:
        assert _leftovers(tmp_path), "the running app has no folder for its composites and examples"
    # composekit_process sends SIGTERM and waits for the exit
    assert proc.returncode == 0, "".join(proc.log_lines)
    assert _leftovers(tmp_path) == []


def test_build_app_removes_its_own_folder_when_the_interpreter_exits(tmp_path):
    code = ("from composekit import Compositor\nfrom composekit.apps.ui import build_app\n"
            "app = build_app(Compositor())\nimport os, tempfile\n"
            "print(len([n for n in os.listdir(tempfile.gettempdir()) if n.startswith('composekit-ui')]))")
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"  # the app had its folder while it lived
    assert _leftovers(tmp_path) == []
