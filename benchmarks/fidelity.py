"""The fidelity/harmony figure of docs/concepts.md, and the distances behind it.

    python -m benchmarks.fidelity --out docs/images/fidelity.png

Pastes the demo's cut-out (scikit-image's coffee cup, or the procedural fallback) into the demo
background with: the naive placement (what fidelity control pulls towards), the classic method, and
the generative method on a tiny random model at fidelity 0, 0.25, 0.5, 0.75 and 1, same seed. Writes
a strip of crops around the box, and prints per fidelity the mean low-pass (factor 2) distance
between the region's final latents and the naive paste's latent. Random weights show the mechanics
of the control (how far the region is pulled towards the naive paste), not the quality of a trained
model's result.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from composekit import Compositor
from composekit.apps.demo import DEMO_BOX, demo_images
from composekit.core.classic import classic_composite
from composekit.core.sampler import lowpass_matrix
from composekit.formats.atomic import save_image_atomic
from composekit.formats.images import load_picture

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="fidelity.png")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from composekit.apps.random_models import make_random_model

    background, obj, source = demo_images()
    with tempfile.TemporaryDirectory() as tmp:
        comp = Compositor.from_pretrained(make_random_model(Path(tmp) / "tiny", "tiny", seed=0), device="cpu")
        bg, ob = load_picture(background), load_picture(obj)
        naive, _ = classic_composite(bg.rgb, ob.rgb, ob.alpha, DEMO_BOX, harmonize=0.0, shadow=0.0, feather=0)
        panels = [("naive paste", naive), ("classic", np.asarray(Compositor().paste(obj, background, DEMO_BOX).image))]
        print(f"{'fidelity':>8}  low-pass distance to the naive paste (region latents, factor 2)")
        for level in LEVELS:
            latents: list[np.ndarray] = []
            result = comp.paste(obj, background, DEMO_BOX, steps=args.steps, seed=args.seed, fidelity=level,
                                progress=False, callback=lambda i, t, x: latents.append(x))
            panels.append((f"fidelity {level:g}", np.asarray(result.image)))
            guide, hole = _naive_latent(comp, bg, ob)
            print(f"{level:>8g}  {_distance(latents[-1], guide, hole):.3f}")

    x0, y0, x1, y1 = DEMO_BOX
    pad = 24
    crop = (max(x0 - pad, 0), max(y0 - pad, 0), x1 + pad, y1 + pad)
    tiles = [Image.fromarray(np.ascontiguousarray(img)).crop(crop).resize(((crop[2] - crop[0]) * 2,
                                                                           (crop[3] - crop[1]) * 2)) for _, img in panels]
    w, h = tiles[0].size
    strip = Image.new("RGB", (w * len(tiles), h + 22), "white")
    draw = ImageDraw.Draw(strip)
    for i, ((label, _), tile) in enumerate(zip(panels, tiles)):
        strip.paste(tile, (i * w, 22))
        draw.text((i * w + 6, 5), label, fill="black")
    save_image_atomic(strip, args.out)
    print(f"wrote {args.out} ({source}; tiny random model, {args.steps} steps, seed {args.seed})")
    return 0


def _naive_latent(comp: Compositor, bg, ob) -> tuple[np.ndarray, np.ndarray]:
    """y_0 as the compositor builds it (naive paste through the same window, VAE-encoded), and the hole."""
    from composekit.core import geometry

    info = comp.backend.info
    window = geometry.plan_window(DEMO_BOX, bg.width, bg.height, info.model_size)
    naive, _ = classic_composite(bg.rgb, ob.rgb, ob.alpha, DEMO_BOX, harmonize=0.0, shadow=0.0, feather=0)
    pixels = geometry.crop_window(naive, window).astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    hole = geometry.model_hole(DEMO_BOX, window, info.vae_scale_factor)
    latent = comp.backend.to_numpy(comp.backend.encode_image(comp.backend.asarray(pixels)))
    return latent, hole[:: info.vae_scale_factor, :: info.vae_scale_factor] > 0.5


def _distance(x: np.ndarray, y: np.ndarray, hole: np.ndarray) -> float:
    """Mean |phi_2((x - y) * hole)| over the hole."""
    p = lowpass_matrix(x.shape[2], 2)
    return float(np.abs(p @ ((x - y) * hole) @ p.T)[0][:, hole].mean())


if __name__ == "__main__":
    raise SystemExit(main())
