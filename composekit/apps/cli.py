"""The ``composekit`` command line.

    composekit paste OBJ [OBJ ...] BG --box X0,Y0,X1,Y1 -o OUT [--model DIR_OR_REPO] [option flags]
    composekit batch OBJ INPUTS... -o OUT_DIR (--box X0,Y0,X1,Y1 | --boxes boxes.json) [--model ...] [--ray]
    composekit serve [--model DIR_OR_REPO] [--port N] [settings flags] [--ray]
    composekit make-model tiny|full OUT [--family F] [--adaptor A] [--unet-channels 9|4] [--seed K]
    composekit demo [DIR]
    composekit env

The option flags of ``paste`` and ``batch`` and the settings flags of ``serve`` are generated from their
declarations (``composekit.core.options``, ``ServeSettings``, ``RaySettings``); flags are read as text
here and checked where the value is used, so the messages are the Python API's (in CLI words).

Exit codes: 0 success; 2 bad arguments or input (:class:`InputError`); 3 model problem
(:class:`ModelError`); 4 backend or device unavailable; 1 any other composekit error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from composekit import __version__
from composekit.core.options import THREADS
from composekit.errors import (BackendUnavailableError, ComposekitError, InputError, ModelError, OutputError,
                               install_hint)
from composekit.formats.atomic import IMAGE_FORMATS, check_output_path, save_image_atomic
from composekit.formats.batch_manifest import BatchManifest
from composekit.formats.images import ALLOWED_FORMATS

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_MODEL, EXIT_BACKEND = 0, 1, 2, 3, 4


def _parse_box(text: str) -> tuple[int, int, int, int]:
    from composekit.core.geometry import parse_box

    try:
        return parse_box(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_input(value: str, stdin_used: list[bool]):
    """A file path, or ``-`` for the bytes on standard input (once)."""
    if value != "-":
        return value
    if stdin_used:
        raise InputError("only one of OBJECT and BACKGROUND can be read from standard input ('-')")
    stdin_used.append(True)
    return sys.stdin.buffer.read()


def _compositor(args: argparse.Namespace):
    """The classic compositor without --model, otherwise the model loaded as the options say."""
    from composekit import Compositor

    if args.model is None:
        return Compositor()
    _apply_threads(args)
    return Compositor.from_pretrained(args.model, **_load_options(args))


def _load_options(args: argparse.Namespace) -> dict:
    """``from_pretrained``'s keywords from the model flags (also handed to Ray actors and replicas)."""
    options = {"backend": args.backend, "device": args.device, "dtype": args.dtype, "local_files_only": args.offline,
               "vae": args.vae}
    if getattr(args, "token_downsampling", None) is not None:  # a torch-backend option: passed only when given
        options["token_downsampling"] = args.token_downsampling
    return options


def _method_options(args: argparse.Namespace, progress: bool = True) -> Any:
    """The validated options of the method that runs, from the option flags given (derived from the one
    option schema, ``composekit.core.options``). Generative with --model, else classic; an option or a
    model flag that the method does not use is refused with the same message as the Python API's."""
    from composekit.core.options import PasteOptions, resolve

    method = args.method or ("generative" if args.model is not None else "classic")
    if method == "generative" and args.model is None:
        raise InputError("--method generative needs --model (a model directory, ONNX export or Hub repo id)")
    if method == "classic":
        given = [flag for flag, dest in _LOAD_FLAGS.items() if getattr(args, dest, None) not in (None, False, "auto")]
        if given:
            raise InputError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the generative method, "
                             "which needs --model (a model directory, ONNX export or Hub repo id)")
    given_options = {name: getattr(args, name) for name, spec in PasteOptions.specs().items()
                     if spec.cli and getattr(args, name, None) is not None}
    return resolve(method, {**given_options, "progress": progress and not args.quiet})


# The flags that say how a model is loaded (meaningless without --model), by destination.
_LOAD_FLAGS = {"--backend": "backend", "--device": "device", "--dtype": "dtype", "--vae": "vae",
               "--threads": "threads", "--offline": "offline", "--token-downsampling": "token_downsampling"}


def _cmd_paste(args: argparse.Namespace) -> int:
    if args.output == "-" and sys.stdout.isatty():
        raise InputError(f"refusing to write {args.format} bytes to a terminal; redirect standard output "
                         "(`> out.png`) or give -o FILE")
    if args.output != "-":
        check_output_path(args.output)  # before minutes of work, not after
    used: list[bool] = []
    objects = [_read_input(o, used) for o in args.object]
    background = _read_input(args.background, used)
    to_stdout = args.output == "-"
    say = sys.stderr if to_stdout else sys.stdout

    options = _method_options(args)
    boxes, masks = args.box or [None], args.mask or [None]
    several = len(objects) > 1
    if several:
        boxes = boxes if args.box else [None] * len(objects)
        masks = masks if args.mask else [None] * len(objects)
        if len(boxes) != len(objects) or len(masks) != len(objects):
            raise InputError(f"{len(objects)} objects need {len(objects)} --box (or --mask) options, one each, "
                             f"in the same order; got {len(args.box or [])} --box and {len(args.mask or [])} --mask")
    elif len(boxes) > 1 or len(masks) > 1:
        raise InputError("several --box or --mask options need as many OBJECT files, one per box")
    comp = _compositor(args)
    result = comp.paste(objects if several else objects[0], background, boxes if several else boxes[0],
                        mask=masks if several else masks[0], seed=args.seed, options=options)
    if to_stdout:
        result.image.save(sys.stdout.buffer, format=args.format)  # checked not to be a terminal before the work
        sys.stdout.buffer.flush()
    else:
        save_image_atomic(result.image, args.output)
    if args.json:
        info = {"output": str(args.output), "method": result.method, "box": result.box,
                "timings": dict(result.timings)}
        if result.method == "generative":
            info.update(seed=result.seed, steps=result.steps)
        if several:
            info.update(boxes=[list(b) for b in result.boxes], seeds=list(result.seeds) if result.method ==
                        "generative" else None)
        print(json.dumps(info, indent=2), file=say)
    elif not args.quiet:
        print(f"wrote {args.output} ({'classic' if result.method == 'classic' else f'seed {result.seed}'}, "
              f"{result.timings['total']:.2f} s)", file=say)
        if args.model is None:
            print("classic method (no model). For generative compositing add --model Fantasy-Studio/Paint-by-Example",
                  file=say)
    return EXIT_OK


def _batch_jobs(args: argparse.Namespace) -> list[tuple[Path, tuple[int, int, int, int], Path]]:
    """(background, box, output) for every background in the inputs and every box for it."""
    suffixes = set(IMAGE_FORMATS)
    backgrounds: list[Path] = []
    for item in map(Path, args.inputs):
        if item.is_dir():
            backgrounds += sorted(p for p in item.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        elif item.is_file():
            backgrounds.append(item)
        else:
            raise InputError(f"{item} is neither an image file nor a folder")
    if not backgrounds:
        raise InputError(f"no background images ({', '.join(ALLOWED_FORMATS)}) found in {args.inputs}")
    if args.boxes:
        try:
            table = json.loads(Path(args.boxes).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--boxes {args.boxes}: cannot read a JSON object of file name -> box(es): {exc}") from None
        if not isinstance(table, dict):
            raise InputError(f"--boxes {args.boxes} must hold a JSON object mapping file names to boxes")
    out_dir = Path(args.output)
    jobs = []
    for bg in backgrounds:
        if args.boxes:
            entry = table.get(bg.name)
            if entry is None:
                raise InputError(f"--boxes has no entry for {bg.name}")
            boxes = entry if entry and isinstance(entry[0], list) else [entry]
        else:
            boxes = [args.box]
        for i, box in enumerate(boxes):
            suffix = f"-{i}" if len(boxes) > 1 else ""
            jobs.append((bg, tuple(box), out_dir / f"{bg.stem}{suffix}.png"))
    return jobs


def _cmd_batch(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if (args.box is None) == (args.boxes is None):
        raise InputError("give exactly one of --box (the same box for every background) or --boxes FILE.json")
    options = _method_options(args, progress=False)  # one bar for the batch, not one per composite
    if options.method == "classic" and args.seed is not None:
        raise InputError("--seed applies to the generative method only, and this batch uses the classic method; "
                         "drop it, or give --model")
    seed = None if options.method == "classic" else 0 if args.seed is None else args.seed
    jobs = _batch_jobs(args)
    if args.ray:
        return _batch_on_ray(args, jobs, options, seed)
    comp = _compositor(args)
    manifest = BatchManifest(args.output)  # a run killed at any point loses nothing (see batch_manifest)
    manifest.remove_partial(out.name for _, _, out in jobs)
    earlier = manifest.earlier()
    records: dict[int, dict] = {}
    todo = []
    for i, (bg, box, out) in enumerate(jobs):
        if out.exists() and not args.overwrite:
            records[i] = manifest.skipped({"background": str(bg), "box": list(box), "output": str(out),
                                           "status": "skipped (output exists; --overwrite to redo)"}, earlier)
        else:
            todo.append((i, bg, box, out))
    stream = comp.paste_stream(({"object": args.object, "background": bg, "box": box, "seed": seed}
                                for _, bg, box, _ in todo), batch_size=args.batch_size, options=options)
    bar = tqdm(total=len(todo), desc="composekit batch", disable=args.quiet or args.json)
    full: OutputError | None = None
    for (i, bg, box, out), result in zip(todo, stream):
        record: dict = {"background": str(bg), "box": list(box), "output": str(out)}
        try:
            if isinstance(result, ComposekitError):
                raise result
            done = {**record, "status": "ok", "seed": result.seed if result.method == "generative" else None,
                    "timings": dict(result.timings)}
            save_image_atomic(result.image, out, before_replace=lambda: manifest.append(done))
        except (InputError, OSError) as exc:  # one bad file does not stop the batch; model errors do
            record.update(status="failed", error=str(exc) if isinstance(exc, ComposekitError) else f"{out}: {exc}")
            if not args.json:
                bar.write(f"composekit: {bg}: {record['error']}", file=sys.stderr)
            full = exc if isinstance(exc, OutputError) else None
        else:
            record = done
        records[i] = record
        bar.update()
        if full is not None:  # the output folder's device is full: the rows left would fail the same way
            break
    bar.close()
    for i, (bg, box, out) in enumerate(jobs):
        records.setdefault(i, {"background": str(bg), "box": list(box), "output": str(out), "status": "failed",
                               "error": f"not run: an earlier output could not be written ({full})"})
    report = [records[i] for i in range(len(jobs))]
    try:
        manifest.finish(report)
    except OutputError as exc:  # the report is still printed; the journal keeps what finished
        print(f"composekit: {exc}", file=sys.stderr)
    return _batch_report(args, report, f" (manifest: {manifest.path})")


def _batch_report(args: argparse.Namespace, records: list[dict], where: str = "") -> int:
    """Print a batch's records (--json) or its summary line; exit status 2 when any record failed."""
    failed = sum(r["status"] == "failed" for r in records)
    skipped = sum(r["status"].startswith("skipped") for r in records)
    if args.json:
        print(json.dumps(records, indent=2))
    elif not args.quiet:
        extra = (f", {skipped} skipped (outputs exist)" if skipped else "") + (f", {failed} FAILED" if failed else "")
        print(f"wrote {len(records) - failed - skipped} composite(s) to {args.output}{where}{extra}")
    return EXIT_INPUT if failed else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "multipart", "prometheus_client", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"composekit serve needs {', '.join(missing)}; {install_hint('serve')}")
    from composekit.apps.serve import ServeSettings, run

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.ray and args.port == 0:
        raise InputError("--ray needs a fixed --port (Ray Serve's proxy does not report a port it picked)")
    import socket

    try:  # fail now, not after loading the model, if the address cannot be bound (a remote Ray head binds its own)
        if not (args.ray and args.address):
            with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((args.host, args.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port "
                         "or --host") from None
    key = args.api_key or os.environ.get("COMPOSEKIT_API_KEY") or None
    settings = _settings(ServeSettings, args, api_key=key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"composekit serve: warning: listening on {args.host} without --api-key; anyone who can reach it can "
              "use it", file=sys.stderr)

    def ready(port: int) -> None:
        what = f"model {args.model}" if args.model else "classic method (no model)"
        where = " on Ray Serve" if args.ray else ""
        print(f"composekit serve: listening on http://{args.host}:{port}{where} ({what}, max batch {settings.max_batch})",
              file=sys.stderr, flush=True)

    if args.ray:
        from composekit.apps import ray_serve

        scale = _settings(ray_serve.RaySettings, args, threads=args.threads)
        ray_serve.run(args.model, _load_options(args) if args.model else {}, settings, scale, host=args.host, port=args.port,
                      address=args.address, on_ready=ready)
        return EXIT_OK
    from composekit.apps.ray_serve import RaySettings

    ray_only = [spec.cli_flag for name, spec in RaySettings.specs().items() if spec.cli and getattr(args, name) is not None]
    ray_only += ["--address"] if args.address is not None else []
    if ray_only:
        raise InputError(f"{', '.join(ray_only)} need{'s' if len(ray_only) == 1 else ''} --ray (Ray Serve's settings): add --ray or drop {'it' if len(ray_only) == 1 else 'them'}")
    comp = _compositor(args)
    logging.getLogger("composekit.apps.serve").setLevel(logging.INFO)  # one line per request, on stderr
    run(comp, settings, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
        on_ready=ready)
    return EXIT_OK


def _cmd_ui(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise BackendUnavailableError(f"composekit ui needs Gradio; {install_hint('ui')}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    auth_text = args.auth or os.environ.get("COMPOSEKIT_UI_AUTH") or None
    auth = None
    if auth_text is not None:
        user, sep, password = auth_text.partition(":")
        if not sep or not user or len(password) < 8:
            raise InputError("--auth must be USER:PASSWORD with a password of at least 8 characters")
        auth = (user, password)
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"composekit ui: warning: listening on {args.host} without --auth; anyone who can reach it can use it",
              file=sys.stderr)
    from composekit.apps.ui import run as run_ui

    comp = _compositor(args)

    def ready(port: int) -> None:
        what = f"model {args.model}" if args.model else "classic method (no model)"
        print(f"composekit ui: listening on http://{args.host}:{port} ({what})", file=sys.stderr, flush=True)

    run_ui(comp, host=args.host, port=args.port, auth=auth, on_ready=ready)
    return EXIT_OK


def _batch_on_ray(args: argparse.Namespace, jobs: list, options: object, seed: int | None) -> int:
    """``composekit batch --ray``: the same jobs on Ray Data (one model-holding actor per worker)."""
    from composekit.apps.ray_batch import RECORDS_FILE, ray_batch

    _apply_threads(args)
    rows = [{"object": str(args.object), "background": str(bg), "box": box, "seed": seed, "output": out.name}
            for bg, box, out in jobs]
    records = ray_batch(args.model, rows, args.output, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                        batch_size=args.batch_size, address=args.address, overwrite=args.overwrite,
                        load_options=_load_options(args) if args.model else None, options=options)
    for r in records:
        if r["status"] == "failed":
            print(f"composekit: {r['background']}: {r['error']}", file=sys.stderr)
    return _batch_report(args, records, f" on Ray (manifest: {Path(args.output) / RECORDS_FILE})")


def _cmd_make_model(args: argparse.Namespace) -> int:
    from composekit.apps.random_models import make_random_model, make_random_tiny_vae

    if args.tiny_vae:
        out = make_random_tiny_vae(args.output, args.size, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote random {args.size} AutoencoderTiny to {out} ({'TAESD-sized' if args.size == 'full' else 'test-sized'})")
        return EXIT_OK
    out = make_random_model(args.output, args.size, family=args.family, adaptor=args.adaptor,
                            unet_channels=args.unet_channels, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote random {args.size} {args.family} model to {out}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from composekit.apps.demo import DEMO_BOX, demo_images, run_demo

    paths = run_demo(args.output, generative=args.generative, steps=args.steps)
    print(f"wrote {paths['classic']}: {paths['object']} pasted into {paths['background']} with the classic method "
          f"({demo_images()[2]})")
    if "generative" in paths:
        print(f"wrote {paths['generative']} with a tiny random model ({paths['model']}): random weights show the "
              "mechanics, not quality")
    box = ",".join(map(str, DEMO_BOX))
    print("For a generative composite with the published Paint-by-Example weights (~5 GB, downloaded once): "
          f"{install_hint('torch')}; then\n"
          f"  composekit paste {paths['object']} {paths['background']} --box {box} -o out.png "
          "--model Fantasy-Studio/Paint-by-Example")
    return EXIT_OK


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _cmd_cache(args: argparse.Namespace) -> int:
    from composekit.backends.openvino_backend import cache_usage, clear_cache

    folder, usage = cache_usage(args.dir)
    if args.clear:
        removed, freed = clear_cache(args.dir)
        if args.json:
            print(json.dumps({"folder": str(folder), "removed_files": removed, "freed_bytes": freed}))
        else:
            print(f"removed {removed} compiled model(s), {_size(freed)}, from {folder}")
        return EXIT_OK
    files, total = sum(n for n, _ in usage.values()), sum(b for _, b in usage.values())
    if args.json:
        print(json.dumps({"folder": str(folder), "files": files, "bytes": total,
                          "folders": {k: {"files": n, "bytes": b} for k, (n, b) in usage.items()}}))
        return EXIT_OK
    print(f"OpenVINO compiled-model cache: {folder}" + ("" if folder.is_dir() else " (not created yet)"))
    for name, (n, b) in usage.items():
        print(f"  {name:<12} {n:>4} compiled model(s)  {_size(b):>9}")
    print(f"  {'total':<12} {files:>4} compiled model(s)  {_size(total):>9}")
    if files:
        print("`composekit cache --clear` removes them (the next load of an export compiles it again)")
    return EXIT_OK


def _cmd_env(args: argparse.Namespace) -> int:
    info: dict[str, object] = {"composekit": __version__, "python": sys.version.split()[0],
                               "platform": platform.platform()}
    for pkg in ("numpy", "pillow", "huggingface_hub", "safetensors", "torch", "diffusers", "transformers",
                "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "cuda-python", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if info["torch"]:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if info["onnxruntime"] or info["onnxruntime-gpu"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if info["openvino"]:
        import openvino

        core = openvino.Core()
        info["openvino_devices"] = {d: core.get_property(d, "OPTIMIZATION_CAPABILITIES") for d in core.available_devices}
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return EXIT_OK


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --backend, --device, --dtype, --offline: how the model is loaded (paste and batch)."""
    p.add_argument("--model", default=None,
                   help="model directory, ONNX export or Hub repo id; without it the weights-free classic method runs")
    p.add_argument("--backend", default="auto",
                   help="auto (default: by what --model holds), torch, onnxruntime, openvino or tensorrt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: by device)")
    p.add_argument("--offline", action="store_true", help="never use the network (like HF_HUB_OFFLINE=1)")
    p.add_argument("--vae", default=None, metavar="DIR_OR_REPO|tiny",
                   help="decode with a tiny autoencoder (speed option): an AutoencoderTiny folder or Hub id such as "
                   "madebyollin/taesd for a diffusers model, 'tiny' for an export made with --tiny-vae")
    p.add_argument("--token-downsampling", type=int, default=None, metavar="N",
                   help="2..4: the U-Net's highest-resolution self-attentions take keys and values from every N-th "
                        "latent cell (speed/quality trade) when torch loads a diffusers model; an export has it "
                        "traced in (composekit-export onnx --token-downsampling N)")
    p.add_argument("--threads", type=_typed(THREADS), default=None,
                   help="CPU threads for the torch backend (default: torch's, one per core). On a machine busy with "
                        "other work, 1 avoids multi-second stalls (see docs/troubleshooting.md)")


def _typed(spec: Any) -> Any:
    """An argparse ``type=`` that reads a flag's text as its declaration says (a clear message if not); the
    range is checked where the value is used, with the Python API's message."""
    def parse(text: str) -> Any:
        try:
            return spec.from_text(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.name
    return parse


def _option_arguments(p: argparse.ArgumentParser) -> None:
    """--method, --seed and one flag per paste option, all from the one option schema."""
    from composekit.core.options import SEED, PasteOptions

    p.add_argument("--method", choices=["generative", "classic"], default=None,
                   help="default: generative with --model, classic without")
    p.add_argument("--seed", type=_typed(SEED), default=None, help=SEED.describe())
    for name, spec in PasteOptions.specs().items():
        if spec.cli:
            only = "" if len(spec.methods) > 1 else f"{spec.methods[0]} method: "
            p.add_argument(spec.cli_flag, dest=name, type=_typed(spec), default=None, metavar=_metavar(spec),
                           help=only + spec.describe())


def _metavar(spec: Any) -> str:
    return "{" + ",".join(spec.choices) + "}" if spec.choices else "N" if spec.kind is int else "X"


def _settings_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of a settings type (ServeSettings, RaySettings) that the CLI offers."""
    for name, spec in cls.specs().items():
        if spec.cli and name != "api_key":
            p.add_argument(spec.cli_flag, dest=name, type=_typed(spec), default=None, metavar=_metavar(spec),
                           help=spec.describe())


def _settings(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """A settings type from the flags that were given (the others keep their declared defaults)."""
    given = {name: getattr(args, name) for name, spec in cls.specs().items()
             if spec.cli and getattr(args, name, None) is not None}
    return cls(**{**given, **values})


def _apply_threads(args: argparse.Namespace) -> None:
    """--threads N: the torch backend's intra-op threads (and OpenMP's, set before torch is imported)."""
    n = THREADS.check(getattr(args, "threads", None))
    if n is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        import torch  # process-wide; the exported-model backends have their own thread options
    except ImportError:
        return
    torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composekit",
        description="Generative object compositing: paste an object into a background so it belongs, "
        "leaving every pixel outside the edited region unchanged.",
        epilog="examples:\n"
        "  composekit demo                      # offline, no weights: example photographs -> a composite\n"
        "  composekit paste obj.png bg.jpg --box 120,80,360,400 -o out.png   # classic method, no model\n"
        "  composekit make-model tiny ./tiny-model\n"
        "  composekit paste obj.png bg.jpg --box 120,80,360,400 -o out.png --model ./tiny-model\n"
        "  composekit paste obj.png bg.jpg --box 120,80,360,400 -o out.png "
        "--model Fantasy-Studio/Paint-by-Example\n"
        "  composekit env",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"composekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what composekit does (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("paste", help="composite an object (or several) into a background",
                       description="Composite OBJECT into BACKGROUND inside --box (or --mask). Several OBJECT "
                       "files take one --box (or --mask) each, in order; later objects see the earlier ones.")
    p.add_argument("object", nargs="+", metavar="OBJECT",
                   help="object image file(s), or - for standard input (an alpha channel marks a cut-out)")
    p.add_argument("background", metavar="BACKGROUND", help="background image file, or - for standard input")
    p.add_argument("--box", type=_parse_box, action="append",
                   help="X0,Y0,X1,Y1 in background pixels (X1, Y1 exclusive); repeat once per object")
    p.add_argument("--mask", action="append", help="mask image file, background-sized; white = editable; "
                   "repeat once per object")
    p.add_argument("-o", "--output", required=True,
                   help="output image file (.png, .jpg, .webp, ...), or - for standard output")
    p.add_argument("--format", default="PNG", choices=list(ALLOWED_FORMATS),
                   help="image format when writing to standard output (default PNG)")
    _model_arguments(p)
    _option_arguments(p)
    p.add_argument("--json", action="store_true", help="print box, seed and timings as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_paste)

    b = sub.add_parser("batch", help="composite one object into many backgrounds (a folder or files)",
                       description="Composite OBJECT into every background image in INPUTS (files or folders), "
                       "with one --box for all or a --boxes JSON file mapping file names to a box or a list of "
                       "boxes. Writes OUTPUT/NAME.png (NAME-i.png for several boxes), with a progress bar.",
                       epilog="example:\n  composekit batch cup.png shots/ --boxes boxes.json -o out/\n"
                       '  boxes.json: {"kitchen.jpg": [120, 80, 360, 400], "desk.png": [[0, 0, 50, 50], [60, 60, 99, 99]]}',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("object", help="object image file")
    b.add_argument("inputs", nargs="+", help="background image files and/or folders of them")
    b.add_argument("-o", "--output", required=True, help="folder for the composites")
    b.add_argument("--box", type=_parse_box, help="X0,Y0,X1,Y1 for every background")
    b.add_argument("--boxes", help="JSON file: {file name: box or [box, ...]}")
    _model_arguments(b)
    _option_arguments(b)  # --seed: the same for every composite (default 0 with a model)
    b.add_argument("--ray", action="store_true",
                   help="run on Ray Data: one model-holding actor per worker; writes OUT_DIR/manifest.jsonl")
    b.add_argument("--address", default=None, help="with --ray: a Ray cluster to join (default: a local one)")
    b.add_argument("--workers", type=int, default=1, help="with --ray: actors running at once (default 1)")
    b.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray: GPUs per actor (default 0)")
    b.add_argument("--batch-size", type=int, default=4,
                   help="composites sampled together (one U-Net call per step for all; default 4)")
    b.add_argument("--overwrite", action="store_true",
                   help="composite again where an output file exists (default: skip it, so a re-run resumes)")
    b.add_argument("--json", action="store_true", help="print one JSON record per composite, with timings")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=_cmd_batch)

    m = sub.add_parser("make-model", help="write a random model in the real on-disk layout",
                       description="Write a randomly initialised model directory "
                       "(diffusers layout, safetensors). tiny: seconds on CPU, for tests and demos. "
                       "full: real SD 1.x dimensions (~5 GB), for latency benchmarks.")
    m.add_argument("size", choices=["tiny", "full"])
    m.add_argument("output", help="directory to create")
    m.add_argument("--family", choices=["paint_by_example", "objectstitch"], default="paint_by_example")
    m.add_argument("--adaptor", choices=["mapper", "conv1d"], default="mapper",
                   help="ObjectStitch content adaptor (default mapper)")
    m.add_argument("--unet-channels", type=int, choices=[9, 4], default=9,
                   help="9 = inpainting U-Net (default), 4 = plain SD U-Net (masked-DDIM path)")
    m.add_argument("--tiny-vae", action="store_true",
                   help="write a random diffusers AutoencoderTiny instead (full = TAESD's architecture), for --vae")
    m.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    m.set_defaults(func=_cmd_make_model)

    d = sub.add_parser("demo", help="offline first run: example photographs -> a composite, no weights",
                       description="Write example images and composite them into DIR/classic.png with the "
                       "weights-free classic method; --generative also builds a tiny random model and writes "
                       "DIR/generative.png.")
    d.add_argument("output", nargs="?", default="composekit-demo", help="folder to write (default ./composekit-demo)")
    d.add_argument("--generative", action="store_true", help="also run the generative method with a tiny random model")
    d.add_argument("--steps", type=int, default=20, help="DDIM steps for --generative (default 20)")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("serve", help="serve one model over HTTP (POST /v1/paste; needs the serve extra)",
                       description="Load one model (or none: the classic method) and serve POST /v1/paste, "
                       "/healthz, /readyz, /metrics and OpenAPI docs. Binds 127.0.0.1 unless --host says otherwise.",
                       epilog="example:\n  composekit serve --model ./tiny-model --port 8000\n"
                       "  curl -F object=@cup.png -F background=@table.jpg -F box=120,80,360,400 -F seed=0 "
                       "http://127.0.0.1:8000/v1/paste -o out.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /healthz (or COMPOSEKIT_API_KEY)")
    from composekit.apps.ray_serve import RaySettings
    from composekit.apps.serve import ServeSettings

    _settings_arguments(s, ServeSettings)
    s.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment (replicas, autoscaling; needs ray[serve])")
    s.add_argument("--address", default=None, help="with --ray: a Ray cluster to join (default: a local one)")
    _settings_arguments(s, RaySettings)
    s.set_defaults(func=_cmd_serve)

    u = sub.add_parser("ui", help="a Gradio app to try composites with the mouse (needs the ui extra)",
                       description="Load one model (or none: the classic method) and serve a Gradio app: upload an "
                       "object and a background, click two corners of the box, run, download the PNG. Binds "
                       "127.0.0.1 unless --host says otherwise.")
    _model_arguments(u)
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    u.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require Gradio's login (or set COMPOSEKIT_UI_AUTH); use it when --host is not loopback")
    u.set_defaults(func=_cmd_ui)

    c = sub.add_parser("cache", help="show (or --clear) the OpenVINO compiled-model cache",
                       description="The OpenVINO backend caches each compiled graph (~8 GB for a full-size export at "
                       "batch 1 and 2) so a second load skips compilation. OpenVINO never removes entries: a new "
                       "export, precision or OpenVINO version adds more. This shows the folder's size per device "
                       "and precision; --clear removes the compiled models (only OpenVINO's *.blob files).")
    c.add_argument("--dir", default=None, help="the cache folder (default: $COMPOSEKIT_CACHE/openvino or "
                   "~/.cache/composekit/openvino, as the backend uses)")
    c.add_argument("--clear", action="store_true", help="remove the cached compiled models")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_cache)

    e = sub.add_parser("env", help="print versions, devices and providers (for bug reports)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_env)
    for command in sub.choices.values():  # -v also after the command; SUPPRESS keeps `composekit -v CMD` working
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log what composekit does (to stderr)")
    return parser


def _negative_boxes(argv: list[str]) -> list[str]:
    """``--box -10,0,50,50``: argparse would read ``-10,...`` as an option; join it to its flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--box" and i + 1 < len(argv) and re.match(r"^-\d", argv[i + 1]):
            out.append(f"--box={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_negative_boxes(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    if args.command == "paste" and not args.box and not args.mask and getattr(args, "region", None) in (None, "box"):
        parser.error("paste needs --box or --mask")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args, "composekit", "torch")


# composekit's errors on the command line: (type, label, exit status), the first that matches.
_EXITS = ((InputError, "error", EXIT_INPUT), (ModelError, "model error", EXIT_MODEL),
          (BackendUnavailableError, "unavailable", EXIT_BACKEND), (ComposekitError, "error", EXIT_ERROR))


def run_command(args: argparse.Namespace, prog: str, extra: str) -> int:
    """Run ``args.func`` and turn composekit's errors into a one-line message and an exit code.

    Shared by ``composekit`` and ``composekit-export``; ``extra`` names the pip extra that provides a
    missing module.
    """
    try:
        return args.func(args)
    except ComposekitError as exc:
        label, code = next((label, code) for kind, label, code in _EXITS if isinstance(exc, kind))
        print(f"{prog}: {label}: {cli_words(str(exc))}", file=sys.stderr)
        return code
    except ModuleNotFoundError as exc:
        print(f"{prog}: this needs {exc.name!r}, which is not installed; {install_hint(extra)}", file=sys.stderr)
        return EXIT_BACKEND
    except BrokenPipeError:  # e.g. `composekit env | head`
        return EXIT_OK
    except OSError as exc:  # an unreadable or unwritable path the checks above did not foresee
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT


# Python keyword arguments in library messages, and the flags that set them on the command line.
_FLAGS = ("device", "dtype", "backend", "decode", "method", "region", "steps", "overwrite", "fidelity", "margin",
          "feather", "context", "guidance_end", "batch_size", "local_files_only")


def cli_words(message: str) -> str:
    """A library message in command-line words: ``device='cpu'`` -> ``--device cpu``, ``overwrite=True``
    -> ``--overwrite``, ``decode='window'`` -> ``--decode window``, ``local_files_only`` -> ``--offline``."""
    def flag(name: str) -> str:
        return "--offline" if name == "local_files_only" else "--" + name.replace("_", "-")

    pattern = r"\b(" + "|".join(_FLAGS) + r")=(True|'([^']*)'|(\d[\d.]*))"
    message = re.sub(pattern, lambda m: flag(m.group(1)) if m.group(2) == "True"
                     else f"{flag(m.group(1))} {m.group(3) if m.group(3) is not None else m.group(4)}", message)
    # A message about one declared option or setting ("steps must be ...", "eta applies to ..."): its flag.
    flags = _declared_flags()
    return re.sub(r"^([a-z_]+) (must be|applies to)", lambda m: f"{flags[m.group(1)]} {m.group(2)}"
                  if m.group(1) in flags else m.group(0), message)


def _declared_flags() -> dict[str, str]:
    """name -> CLI flag of every declared option and setting (composekit.core.options)."""
    from composekit.apps.ray_serve import RaySettings
    from composekit.apps.serve import ServeSettings
    from composekit.core.options import SEED, PasteOptions

    specs = {**PasteOptions.specs(), **ServeSettings.specs(), **RaySettings.specs(), "seed": SEED, "threads": THREADS}
    return {name: spec.cli_flag for name, spec in specs.items()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
