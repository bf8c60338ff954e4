"""The ``composekit`` command line.

    composekit paste OBJ BG --box X0,Y0,X1,Y1 -o OUT --model DIR_OR_REPO [--steps N] [--seed K]
    composekit make-model tiny|full OUT [--family F] [--adaptor A] [--unet-channels 9|4] [--seed K]
    composekit batch OBJ INPUTS... -o OUT_DIR (--box X0,Y0,X1,Y1 | --boxes boxes.json) [--model ...]
    composekit demo [DIR]
    composekit env

Exit codes: 0 success; 2 bad arguments or input (:class:`InputError`); 3 model problem
(:class:`ModelError`); 4 backend or device unavailable; 1 any other composekit error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from .errors import BackendUnavailableError, ComposekitError, InputError, ModelError
from .files import save_image_atomic

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_MODEL, EXIT_BACKEND = 0, 1, 2, 3, 4


def _version() -> str:
    try:
        return metadata.version("composekit")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _parse_box(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"box must be four integers X0,Y0,X1,Y1, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box must be four integers X0,Y0,X1,Y1, got {text!r}")
    return values  # type: ignore[return-value]


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
    from . import Compositor

    if args.model is None:
        return Compositor()
    return Compositor.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                      local_files_only=args.offline)


def _generative_options(args: argparse.Namespace) -> dict:
    """Options that only the generative method takes (the classic one has no steps to cut or latents to decode)."""
    if args.model is None:
        return {}
    return {"guidance_end": args.guidance_end, "decode": args.decode}


def _cmd_paste(args: argparse.Namespace) -> int:
    used: list[bool] = []
    obj, background = _read_input(args.object, used), _read_input(args.background, used)
    to_stdout = args.output == "-"
    say = sys.stderr if to_stdout else sys.stdout

    if args.model is None and args.method == "generative":
        raise InputError("--method generative needs --model (a model directory or Hub repo id)")
    comp = _compositor(args)
    result = comp.paste(
        obj, background, args.box, mask=args.mask, steps=args.steps, guidance=args.guidance,
        eta=args.eta, seed=args.seed, context=args.context, progress=not args.quiet, method=args.method,
        **_generative_options(args),
    )
    if to_stdout:
        result.image.save(sys.stdout.buffer, format=args.format)
        sys.stdout.buffer.flush()
    else:
        save_image_atomic(result.image, args.output)
    if args.json:
        print(json.dumps({"output": str(args.output), "box": result.box, "seed": result.seed,
                          "steps": result.steps, "timings": dict(result.timings)}, indent=2), file=say)
    elif not args.quiet:
        print(f"wrote {args.output} ({'classic' if result.steps == 0 else f'seed {result.seed}'}, "
              f"{result.timings['total']:.2f} s)", file=say)
        if args.model is None:
            print("classic method (no model). For generative compositing add --model Fantasy-Studio/Paint-by-Example",
                  file=say)
    return EXIT_OK


def _batch_jobs(args: argparse.Namespace) -> list[tuple[Path, tuple[int, int, int, int], Path]]:
    """(background, box, output) for every background in the inputs and every box for it."""
    from .images import ALLOWED_FORMATS

    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
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
    jobs = _batch_jobs(args)
    comp = _compositor(args)
    report = []
    for bg, box, out in tqdm(jobs, desc="composekit batch", disable=args.quiet or args.json):
        result = comp.paste(args.object, bg, box, steps=args.steps, guidance=args.guidance, seed=args.seed,
                            progress=False, **_generative_options(args))
        save_image_atomic(result.image, out)
        report.append({"background": str(bg), "box": list(result.box), "output": str(out), "seed": result.seed,
                       "timings": dict(result.timings)})
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print(f"wrote {len(report)} composites to {args.output}")
    return EXIT_OK


def _cmd_make_model(args: argparse.Namespace) -> int:
    from .random_models import make_random_model

    out = make_random_model(args.output, args.size, family=args.family, adaptor=args.adaptor,
                            unet_channels=args.unet_channels, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote random {args.size} {args.family} model to {out}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_BOX, demo_images, run_demo

    paths = run_demo(args.output, generative=args.generative, steps=args.steps)
    print(f"wrote {paths['classic']}: {paths['object']} pasted into {paths['background']} with the classic method "
          f"({demo_images()[2]})")
    if "generative" in paths:
        print(f"wrote {paths['generative']} with a tiny random model ({paths['model']}): random weights show the "
              "mechanics, not quality")
    box = ",".join(map(str, DEMO_BOX))
    print("For a generative composite with the published Paint-by-Example weights (~5 GB, downloaded once):\n"
          f"  composekit paste {paths['object']} {paths['background']} --box {box} -o out.png "
          "--model Fantasy-Studio/Paint-by-Example")
    return EXIT_OK


def _cmd_env(args: argparse.Namespace) -> int:
    info: dict[str, object] = {"composekit": _version(), "python": sys.version.split()[0],
                               "platform": platform.platform()}
    for pkg in ("numpy", "pillow", "huggingface_hub", "safetensors", "torch", "diffusers", "transformers",
                "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "cupy-cuda12x", "cupy-cuda13x"):
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
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return EXIT_OK


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
    parser.add_argument("--version", action="version", version=f"composekit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what composekit does (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("paste", help="composite an object into a background",
                       description="Composite OBJECT into BACKGROUND inside --box (or --mask).")
    p.add_argument("object", help="object image file, or - for standard input (an alpha channel marks a cut-out)")
    p.add_argument("background", help="background image file, or - for standard input")
    p.add_argument("--box", type=_parse_box, help="X0,Y0,X1,Y1 in background pixels (X1, Y1 exclusive)")
    p.add_argument("--mask", help="mask image file, background-sized; white = editable")
    p.add_argument("-o", "--output", required=True,
                   help="output image file (.png, .jpg, .webp, ...), or - for standard output")
    p.add_argument("--format", default="PNG", choices=["PNG", "JPEG", "WEBP", "BMP", "TIFF"],
                   help="image format when writing to standard output (default PNG)")
    p.add_argument("--model", default=None,
                   help="model directory, ONNX export or Hub repo id; without it the weights-free classic method runs")
    p.add_argument("--method", choices=["generative", "classic"], default=None,
                   help="default: generative with --model, classic without")
    p.add_argument("--backend", default="auto",
                   help="auto (default: by what --model holds), torch, onnxruntime or tensorrt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: by device)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    p.add_argument("--context", type=float, default=2.0, help="context window side / box side (default 2)")
    p.add_argument("--guidance-end", type=float, default=1.0,
                   help="fraction of the steps that use guidance; later steps run one U-Net pass (default 1)")
    p.add_argument("--decode", choices=["window", "region"], default="window",
                   help="decode the whole context window (default) or only the edited region plus a margin")
    p.add_argument("--offline", action="store_true", help="never use the network (like HF_HUB_OFFLINE=1)")
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
    b.add_argument("--model", default=None, help="model directory, ONNX export or Hub repo id (default: classic)")
    b.add_argument("--backend", default="auto")
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default=None)
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--guidance", type=float, default=5.0)
    b.add_argument("--seed", type=int, default=0, help="seed for every composite (default 0)")
    b.add_argument("--guidance-end", type=float, default=1.0, help="as for paste")
    b.add_argument("--decode", choices=["window", "region"], default="window", help="as for paste")
    b.add_argument("--offline", action="store_true")
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

    e = sub.add_parser("env", help="print versions, devices and providers (for bug reports)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    if args.command == "paste" and args.box is None and args.mask is None:
        parser.error("paste needs --box or --mask")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args, "composekit", "torch")


def run_command(args: argparse.Namespace, prog: str, extra: str) -> int:
    """Run ``args.func`` and turn composekit's errors into a one-line message and an exit code.

    Shared by ``composekit`` and ``composekit-export``; ``extra`` names the pip extra that provides a
    missing module.
    """
    try:
        return args.func(args)
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ModelError as exc:
        print(f"{prog}: model error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except BackendUnavailableError as exc:
        print(f"{prog}: unavailable: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    except ComposekitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        print(f"{prog}: this needs {exc.name!r}, which is not installed: "
              f"`pip install torch==2.13.0 && pip install 'composekit[{extra}]'`", file=sys.stderr)
        return EXIT_BACKEND
    except BrokenPipeError:  # e.g. `composekit env | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
