"""A batch's manifest, kept so that a run killed at any point (``kill -9``, a lost machine) loses nothing.

``OUTPUT/manifest.jsonl`` lists every row of the last run, in the rows' order, and is written in one
atomic rename when a run ends. While a run goes on, each finished row is appended to the journal
``OUTPUT/.manifest.journal.jsonl`` (one ``write`` of one line; a line cut short by a crash is ignored
when read) once its image is written and just before it is renamed into place: an output that exists
always has its record (a record whose output does not exist is ignored, and that row runs again). The next run reads the manifest and the
journal: a row whose output exists is skipped and keeps the seed and timings of the run that wrote it,
the others run again. Temporary files of outputs that a
killed run was writing (``.NAME.*.tmp`` beside them) are removed before the run starts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from composekit.formats.atomic import atomic_file

__all__ = ["MANIFEST", "JOURNAL", "BatchManifest"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
JOURNAL = ".manifest.journal.jsonl"


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON-object lines of ``path`` (none if it is missing; a cut or foreign line is skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str):
            out.append(record)
    return out


class BatchManifest:
    """The manifest and journal of one output folder (see the module's docstring)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.path, self.journal = self.dir / MANIFEST, self.dir / JOURNAL

    def earlier(self) -> dict[str, dict[str, Any]]:
        """Output name -> the latest record of an earlier run that wrote it (status ok), from the manifest and the
        journal of a run that did not finish."""
        found: dict[str, dict[str, Any]] = {}
        for record in _records(self.path) + _records(self.journal):
            if record.get("status") == "ok":
                found[Path(record["output"]).name] = record
        return found

    def skipped(self, record: dict[str, Any], earlier: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The record of a row skipped because its output exists: the earlier run's, marked skipped."""
        before = earlier.get(Path(record["output"]).name)
        if before is None:
            return record
        return {**record, "seed": before.get("seed"), "timings": before.get("timings", {})}

    def remove_partial(self, names: Iterable[str]) -> list[Path]:
        """Delete the temporary files a killed run left beside ``names`` (outputs in this folder)."""
        removed = []
        for name in names:
            for tmp in self.dir.glob(f".{Path(name).name}.*.tmp"):
                try:
                    tmp.unlink()
                    removed.append(tmp)
                except OSError:
                    pass
        if removed:
            logger.info("removed %d partial file(s) of an interrupted run in %s", len(removed), self.dir)
        return removed

    def append(self, record: dict[str, Any]) -> None:
        """Journal one finished row: one line, one write (a crash leaves it whole or cut, never interleaved).
        A journal that cannot be written (a full disk) is logged and skipped: the manifest written at the end
        still lists the row."""
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.warning("cannot journal %s in %s: %s", record.get("output"), self.journal, exc)

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Write the run's manifest atomically and drop the journal."""
        with atomic_file(self.path) as f:
            for record in records:
                f.write((json.dumps(record) + "\n").encode())
        self.journal.unlink(missing_ok=True)
