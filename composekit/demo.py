"""The offline first run: synthetic example images, a tiny random model, one composite.

Random weights cannot produce a meaningful object, so the demo shows the mechanics — the context
window, the regenerated box and the untouched background — not quality. For real results, point
``composekit paste --model`` at ``Fantasy-Studio/Paint-by-Example`` (downloads ~5 GB once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["demo_images", "run_demo"]


def demo_images(width: int = 640, height: int = 480) -> tuple[Image.Image, Image.Image]:
    """A procedural background (sky, sun, ground) and an RGBA cut-out object (a red ball)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = 0.62 * height
    sky = np.stack([120 + 80 * yy / horizon, 170 + 60 * yy / horizon, 255 - 20 * yy / horizon], -1)
    ground = np.stack([90 + 40 * (yy - horizon) / height, 140 - 30 * (yy - horizon) / height,
                       60 + 0 * yy], -1)
    bg = np.where((yy < horizon)[..., None], sky, ground)
    sun = (xx - 0.8 * width) ** 2 + (yy - 0.2 * height) ** 2 < (0.07 * height) ** 2
    bg[sun] = (255, 230, 120)
    background = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")

    s = 160
    oy, ox = np.mgrid[0:s, 0:s].astype(np.float32)
    r = np.hypot(ox - s / 2, oy - s / 2) / (s / 2 - 4)
    shade = np.clip(1.15 - np.hypot(ox - s * 0.35, oy - s * 0.35) / s, 0.3, 1.0)
    ball = np.stack([230 * shade, 40 * shade, 40 * shade], -1)
    alpha = np.clip((1.0 - r) * 40, 0, 1) * 255
    obj = Image.fromarray(np.dstack([ball, alpha]).astype(np.uint8), "RGBA")
    return background, obj


def run_demo(out_dir: str | Path, steps: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write ``background.png``, ``object.png`` and ``composite.png`` (and ``tiny-model/``) to ``out_dir``."""
    from .compositor import Compositor
    from .files import save_image_atomic
    from .random_models import make_random_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-model"
    if not (model / "model_index.json").exists():
        make_random_model(model, "tiny", seed=0, overwrite=True)
    background, obj = demo_images()
    paths = {"background": out / "background.png", "object": out / "object.png", "composite": out / "composite.png"}
    save_image_atomic(background, paths["background"])
    save_image_atomic(obj, paths["object"])
    comp = Compositor.from_pretrained(model, device="cpu")
    result = comp.paste(obj, background, (250, 230, 410, 390), steps=steps, seed=seed, progress=False)
    save_image_atomic(result.image, paths["composite"])
    paths["model"] = model
    return paths
