"""docs/quickstart.md runs as written: its commands and Python blocks, in order, in an empty folder."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), re.S)


def test_quickstart_runs_as_written(tmp_path):
    blocks = _blocks()
    assert [kind for kind, _ in blocks].count("bash") >= 3 and any(kind == "python" for kind, _ in blocks)
    namespace: dict = {}
    ran = 0
    for kind, body in blocks:
        if kind == "python":
            code = compile(body, str(DOC), "exec")
            import os

            here = os.getcwd()
            os.chdir(tmp_path)
            try:
                exec(code, namespace)  # noqa: S102 - the documentation's own example
            finally:
                os.chdir(here)
            ran += 1
            continue
        for line in body.strip().splitlines():
            if line.startswith("pip "):
                continue  # installs: the test environment has these packages
            words = shlex.split(line)
            assert words[0] == "composekit", line
            proc = subprocess.run([sys.executable, "-m", "composekit", *words[1:]], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, (line, proc.stderr[-2000:])
            ran += 1
    assert ran >= 6
    for name in ("classic.png", "generative.png", "python.png", "composekit-demo/classic.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
