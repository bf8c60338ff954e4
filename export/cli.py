"""The ``composekit-export`` command.

    composekit-export convert-objectstitch ObjectStitch.pth CLIP_DIR OUT_DIR [--size full|tiny]
    composekit-export onnx MODEL_DIR OUT_DIR [--fp16] [--dynamic-spatial] [--opset 17] [--optimize cpu|cuda]
    composekit-export tensorrt ONNX_DIR ENGINE_DIR [--timing-cache FILE] [--workspace-gb N]
    composekit-export adaptor-params

Exit codes as for ``composekit``: 0 ok, 2 bad input, 3 model problem, 4 missing dependency or GPU,
1 other composekit error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from composekit.apps.cli import run_command


def _convert(args: argparse.Namespace) -> int:
    from .convert_objectstitch import convert_objectstitch

    report = convert_objectstitch(args.checkpoint, args.clip_dir, args.output, size=args.size,
                                  overwrite=args.overwrite)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v} tensors" for k, v in report.mapped.items()))
    for reason, keys in report.ignored.items():
        print(f"  not converted ({reason}): {len(keys)} keys")
    if report.unmapped:
        print(f"  UNMAPPED ({len(report.unmapped)}), see {args.output}/conversion_report.json: {report.unmapped[:5]}")
    print(f"  {report.schedule_check}; CLIP weights from {report.clip_weights_from}")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    manifest = export_onnx(args.model_dir, args.output, precision="fp16" if args.fp16 else "fp32",
                           dynamic_spatial=args.dynamic_spatial, max_batch=args.max_batch, opset=args.opset,
                           check=not args.no_check, overwrite=args.overwrite, optimize=args.optimize,
                           tiny_vae=args.tiny_vae, int8=args.int8,
                           token_downsampling=args.token_downsampling)
    print(f"wrote {args.output} ({manifest['precision']}, opset {manifest['opset']})")
    for name, c in manifest["components"].items():
        size = c["bytes"] + sum(e["bytes"] for e in c["external_data"])
        err = c["max_abs_error_vs_torch"]
        err_text = "not checked" if err is None else f"max |onnxruntime - torch| = {err:.3g}"
        print(f"  {name:<15} {size / 1e6:10.1f} MB  {c['export_seconds']:7.1f} s  {err_text}")
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt_build import build_engines

    engines = build_engines(args.onnx_dir, args.output, timing_cache=args.timing_cache,
                            workspace_gb=args.workspace_gb, overwrite=args.overwrite)
    print(f"wrote {len(engines)} engines to {args.output}")
    return 0


def _adaptor_params(args: argparse.Namespace) -> int:
    import torch

    from composekit.apps.random_models import component_configs
    from composekit.core.adaptors import ContentAdaptor

    cfg = component_configs(args.size)["adaptor"]
    rows = {}
    for kind in ("mapper", "conv1d"):
        torch.manual_seed(0)
        adaptor = ContentAdaptor(kind=kind, **cfg).eval()
        with torch.no_grad():
            out = adaptor(torch.zeros(1, cfg["tokens_in"], cfg["width"]))
        rows[kind] = {"parameters": sum(p.numel() for p in adaptor.parameters()),
                      "input": [cfg["tokens_in"], cfg["width"]], "context": list(out.shape[1:])}
    print(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="composekit-export", description="composekit's export toolchain")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("convert-objectstitch", help="convert BCMI's ObjectStitch.pth into composekit's layout",
                       description="Convert BCMI's ObjectStitch.pth (+ its CLIP ViT-L/14 folder) into an "
                       "ObjectStitch model directory. Pickle is read with torch.load(weights_only=True) only.")
    c.add_argument("checkpoint", help="ObjectStitch.pth (or a .safetensors state dict)")
    c.add_argument("clip_dir", help="the CLIP folder shipped with it (openai-clip-vit-large-patch14)")
    c.add_argument("output", help="model directory to create")
    c.add_argument("--size", choices=["full", "tiny"], default="full",
                   help="architecture of the U-Net/VAE (full = SD 1.x, the public checkpoint; tiny = tests)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_convert)
    o = sub.add_parser("onnx", help="export a model directory to ONNX graphs + manifest.json",
                       description="Export the object encoder, U-Net, VAE encoder and VAE decoder to ONNX, check "
                       "each against PyTorch with onnxruntime, and write manifest.json. Load the result with "
                       "Compositor.from_pretrained(OUT_DIR, backend='onnxruntime').")
    o.add_argument("model_dir", help="model directory (diffusers layout)")
    o.add_argument("output", help="export directory to create")
    o.add_argument("--fp16", action="store_true", help="export fp16 graphs (default fp32)")
    o.add_argument("--tiny-vae", default=None, metavar="DIR_OR_REPO",
                   help="also export this diffusers AutoencoderTiny's decoder (e.g. madebyollin/taesd), used with "
                   "from_pretrained(OUT_DIR, vae='tiny') / --vae tiny")
    o.add_argument("--optimize", choices=("cpu", "cuda"), default=None,
                   help="fuse the U-Net with onnxruntime's transformer optimizer: 'cpu' (attention and layer-norm "
                   "fusions, any provider) or 'cuda' (all fusions, CUDA provider only). Fused graphs run on "
                   "onnxruntime only, not OpenVINO (default: plain graphs)")
    o.add_argument("--int8", action="store_true",
                   help="quantize the U-Net graphs to int8 (NNCF post-training quantization, calibrated on composekit's "
                        "own sampler; needs the int8 extra): a QDQ ONNX graph (ONNX Runtime, TensorRT) and an OpenVINO "
                        "IR beside it (NAME.int8.xml/.bin, which the OpenVINO backend loads); run with no option")
    o.add_argument("--token-downsampling", type=int, default=1, metavar="N",
                   help="2..4: the U-Net's highest-resolution self-attentions take keys and values from every N-th "
                        "latent cell in each direction (faster, a quality trade; recorded in the manifest); 1 = off")
    o.add_argument("--dynamic-spatial", action="store_true", help="dynamic image size (default: fixed model size)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--max-batch", type=int, default=8,
                   help="most composites sampled together at run time (paste_batch, serve); U-Net batch up to 2x")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")
    o.add_argument("--overwrite", action="store_true")
    o.set_defaults(func=_onnx)

    t = sub.add_parser("tensorrt", help="build TensorRT engines from an ONNX export (needs TensorRT and a GPU)",
                       description="Build one engine per component with the spec's optimisation profiles, as a "
                       "strongly typed network in the export's precision (export with --fp16 for fp16 engines), "
                       "reusing a timing cache; write a JSON sidecar beside each engine. Never run by the "
                       "project: see export/tensorrt_build.py.")
    t.add_argument("onnx_dir", help="an ONNX export directory (composekit-export onnx)")
    t.add_argument("output", help="engine directory to create")
    t.add_argument("--timing-cache", help="timing cache file (default: composekit-timing.cache beside OUTPUT)")
    t.add_argument("--workspace-gb", type=float, default=None)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_tensorrt)

    a = sub.add_parser("adaptor-params", help="print the content adaptors' parameter counts and shapes")
    a.add_argument("--size", choices=["full", "tiny"], default="full")
    a.set_defaults(func=_adaptor_params)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args, "composekit-export", "export")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
