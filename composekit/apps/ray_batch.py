"""Batch compositing on Ray Data: one model-holding actor per worker, many machines if Ray has them.

    from composekit.apps.ray_batch import ray_batch
    report = ray_batch("./my-model", rows, "out/", workers=2, batch_size=4, steps=25)

``rows`` are dicts with ``object``, ``background`` (local paths, or URIs pyarrow's filesystems read:
``s3://``, ``gs://``, ...), ``box`` (``(x0, y0, x1, y1)``) and optionally ``seed`` and ``output`` (a file
name inside ``output_dir``); or a ``ray.data.Dataset`` of such rows. Each worker is a Ray actor that
loads the :class:`~composekit.Compositor` once and runs its rows through ``paste_batch``; each result is
written atomically to ``output_dir``, and ``output_dir/manifest.jsonl`` records every row: status
(``ok`` / ``failed`` / ``skipped``), error, seed, timings. A failed row does not fail the job; rows
whose output already exists are skipped, so a re-run resumes, and a job killed at any point loses
nothing: each actor journals its finished rows as it goes (``composekit.formats.batch_manifest``).

Without ``address`` a local Ray cluster is started on 127.0.0.1 (no dashboard, usage stats off); with
one, the job joins that cluster (``ray start --head`` on one node, ``ray start --address ...`` on the
others). Needs the ``ray`` extra.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from composekit.core.geometry import parse_box
from composekit.core.options import check_integer
from composekit.errors import BackendUnavailableError, InputError, OutputError, install_hint
from composekit.formats.batch_manifest import MANIFEST, BatchManifest

__all__ = ["ray_batch", "RECORDS_FILE"]

logger = logging.getLogger(__name__)
RECORDS_FILE = MANIFEST


def _read(source: str) -> bytes | str:
    """A local path as is (composekit reads it); a URI's bytes through pyarrow's filesystems."""
    if "://" not in source:
        return source
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(source)
    with fs.open_input_stream(path) as f:
        return f.read()


class _BatchActor:
    """A Ray Data actor: one Compositor per worker, loaded once, fed batches of rows."""

    def __init__(self, model: str | None, load: dict[str, Any], options: dict[str, Any], output_dir: str) -> None:
        from composekit import Compositor

        self.comp = Compositor.from_pretrained(model, **load) if model else Compositor()
        self.options, self.output_dir = options, Path(output_dir)
        self.manifest = BatchManifest(output_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from composekit.errors import ComposekitError
        from composekit.formats.atomic import save_image_atomic

        n = len(batch["output"])
        jobs, status, error, seeds, timings = [], [], [], [], []
        for i in range(n):
            if str(batch.get("status", [""] * n)[i]) == "skipped" or str(batch.get("error", [""] * n)[i]):
                jobs.append(None)  # decided before the actor: output exists, or the row is malformed
                continue
            try:
                box = parse_box(str(batch["box"][i]))
                seed = int(batch["seed"][i]) if int(batch["seed"][i]) >= 0 else None
                jobs.append({"object": _read(str(batch["object"][i])), "background": _read(str(batch["background"][i])),
                             "box": box, "seed": seed})
            except InputError as exc:
                jobs.append(exc)
            except (OSError, ValueError) as exc:
                jobs.append(InputError(f"cannot read row {i}: {exc}"))
        ready = [j for j in jobs if j is not None and not isinstance(j, Exception)]
        results = iter(self.comp.paste_batch(ready, batch_size=max(len(ready), 1), **self.options)) if ready else iter(())
        for i, job in enumerate(jobs):
            if job is None:
                status.append(str(batch["status"][i]) or "failed")
                error.append(str(batch["error"][i]))
                seeds.append(-1)
                timings.append("{}")
                continue
            result = job if isinstance(job, Exception) else next(results)
            seed, times = -1, "{}"
            try:
                if isinstance(result, Exception):
                    raise result
                used = result.seed if result.method == "generative" else -1
                took = json.dumps({k: round(v, 6) for k, v in result.timings.items()})
                done = _record({key: batch[key][i] for key in ("object", "background", "box", "output")}, "ok", "",
                               used, took)
                # journaled before the rename: a job killed at any point loses nothing
                save_image_atomic(result.image, self.output_dir / str(batch["output"][i]),
                                  before_replace=lambda: self.manifest.append(done))
                seed, times = used, took
                status.append("ok")
                error.append("")
            except (ComposekitError, OSError) as exc:
                status.append("failed")
                error.append(f"{type(exc).__name__}: {exc}")
            seeds.append(seed)
            timings.append(times)
        return {"object": list(batch["object"]), "background": list(batch["background"]), "box": list(batch["box"]),
                "output": list(batch["output"]), "status": status, "error": error, "seed": seeds, "timings": timings}


def _record(row: dict[str, Any], status: str, error: str, seed: int, timings: str) -> dict[str, Any]:
    """One manifest record (the driver's and the journal's are the same)."""
    return {"object": str(row["object"]), "background": str(row["background"]), "box": str(row["box"]),
            "seed": None if int(seed) < 0 else int(seed), "output": str(row["output"]), "status": str(status),
            "error": str(error), "timings": json.loads(str(timings))}


def _row(i: int, row: Any) -> dict[str, Any]:
    """One row as plain columns: object, background, box "x0,y0,x1,y1", seed (-1 = draw one), output name."""
    if not isinstance(row, dict) or not {"object", "background", "box"} <= set(row):
        raise InputError(f"row {i} must be a dict with 'object', 'background' and 'box'; got {str(row)[:200]}")
    box = row["box"]
    if isinstance(box, str):
        box = parse_box(box)
    if len(box) != 4:
        raise InputError(f"row {i}: box must be (x0, y0, x1, y1), got {row['box']!r}")
    name = row.get("output") or f"{Path(str(row['background']).split('://')[-1]).stem}.png"
    if Path(name).name != name:
        raise InputError(f"row {i}: output {name!r} must be a file name inside the output folder")
    seed = row.get("seed")
    return {"object": str(row["object"]), "background": str(row["background"]),
            "box": ",".join(str(int(v)) for v in box), "seed": -1 if seed is None else int(seed), "output": name}


def _rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row checked (:func:`_row`), with distinct output names."""
    out, names = [], set()
    for i, raw in enumerate(rows):
        row = _row(i, raw)
        if row["output"] in names:
            raise InputError(f"row {i}: output {row['output']!r} is used by two rows; give each row its own 'output'")
        names.add(row["output"])
        out.append(row)
    return out


def _normalized(raw: dict[str, Any], output_dir: str, overwrite: bool) -> dict[str, Any]:
    """A Dataset row, checked where it runs: a malformed row is marked failed, a finished one skipped."""
    try:
        row = _row(-1, {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v)
                        for k, v in raw.items()})
    except InputError as exc:
        keep = {k: str(raw.get(k, "")) for k in ("object", "background", "box", "output")}
        return {**keep, "seed": -1, "status": "failed", "error": f"InputError: {exc}"}
    done = not overwrite and (Path(output_dir) / row["output"]).exists()
    return {**row, "status": "skipped" if done else "", "error": ""}


def _start_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(f"Ray is not installed; {install_hint('ray')}") from exc
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:  # a local cluster on loopback only
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
    return ray


def ray_batch(model: str | os.PathLike | None, rows: Any, output_dir: str | os.PathLike, *, workers: int = 1,
              gpus_per_worker: float = 0, batch_size: int = 4, address: str | None = None, overwrite: bool = False,
              load_options: dict[str, Any] | None = None, **options: Any) -> list[dict[str, Any]]:
    """Composite ``rows`` on Ray Data into ``output_dir``; returns (and writes) the manifest records.

    ``model`` None = the classic method. ``options`` are :meth:`Compositor.paste_batch`'s shared options
    (``steps``, ``guidance``, ``fidelity``, ...); ``load_options`` go to ``from_pretrained`` (``device``,
    ``backend``, ...). ``workers`` actors run at once, each with ``gpus_per_worker`` GPUs.
    """
    check_integer("workers", workers, 1, 10_000)
    check_integer("batch_size", batch_size, 1, 256)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = BatchManifest(out)
    earlier = manifest.earlier()
    _start_ray(address)
    import ray.data  # (binds ``ray`` too)

    constructor = {"model": None if model is None else str(model), "load": load_options or {}, "options": options,
                   "output_dir": str(out)}
    if isinstance(rows, ray.data.Dataset):
        # Rows stay in the cluster: each is checked and skipped (output exists) where it runs; only the
        # small result records come back to the driver. Output names are not checked for uniqueness here.
        todo = rows.map(_normalized, fn_kwargs={"output_dir": str(out), "overwrite": overwrite})
        records = []
    else:
        table = _rows(rows)
        records = [manifest.skipped({**row, "status": "skipped", "error": "", "seed": None, "timings": {}}, earlier)
                   for row in table if (out / row["output"]).exists() and not overwrite]
        skipped = {r["output"] for r in records}
        pending = [row for row in table if row["output"] not in skipped]
        manifest.remove_partial(row["output"] for row in pending)
        todo = ray.data.from_items(pending) if pending else None
    if todo is not None:
        done = todo.map_batches(_BatchActor, fn_constructor_kwargs=constructor, batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_gpus=gpus_per_worker or None, batch_format="numpy")
        for r in done.take_all():
            record = _record(r, r["status"], r["error"], r["seed"], r["timings"])
            records.append(manifest.skipped(record, earlier) if record["status"] == "skipped" else record)
    if not isinstance(rows, ray.data.Dataset):  # the manifest lists the rows in the caller's order
        order = {row["output"]: i for i, row in enumerate(table)}
        records.sort(key=lambda r: order[r["output"]])
    try:
        manifest.finish(records)
    except OutputError as exc:  # a full disk: the records are still returned; the journal keeps what finished
        logger.warning("%s", exc)
    return records
