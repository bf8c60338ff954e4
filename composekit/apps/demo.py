"""The first run: real example photographs, composited at once, offline, with no model weights.

With scikit-image installed (the ``examples`` extra) the demo pastes the espresso cup
of scikit-image's ``coffee`` photograph (cut out with an elliptical alpha around its saucer) onto the
table beside the shuttle model in its ``astronaut`` photograph. Without scikit-image it falls back
to procedural images. ``generative=True`` also runs the generative method with a tiny random model
built on the spot (needs the ``torch`` extra): random weights show the mechanics — the regenerated
box and the untouched background — not quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from composekit.errors import InputError

__all__ = ["demo_images", "run_demo", "DEMO_BOX"]

DEMO_BOX = (380, 208, 504, 300)  # on the table beside the shuttle model, in the astronaut photograph


def _photographs() -> tuple[Image.Image, Image.Image] | None:
    try:
        from skimage import data
    except ImportError:
        return None
    background = Image.fromarray(data.astronaut())
    coffee = Image.fromarray(data.coffee()).crop((70, 60, 490, 400))  # cup and saucer
    alpha = Image.new("L", coffee.size, 0)
    ImageDraw.Draw(alpha).ellipse((8, 14, coffee.width - 8, coffee.height - 14), fill=255)
    coffee.putalpha(alpha.filter(ImageFilter.GaussianBlur(2)))
    return background, coffee


def _procedural(width: int = 512, height: int = 512) -> tuple[Image.Image, Image.Image]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = 0.62 * height
    sky = np.stack([120 + 80 * yy / horizon, 170 + 60 * yy / horizon, 255 - 20 * yy / horizon], -1)
    ground = np.stack([90 + 40 * (yy - horizon) / height, 140 - 30 * (yy - horizon) / height, 60 + 0 * yy], -1)
    bg = np.where((yy < horizon)[..., None], sky, ground)
    background = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    s = 160
    oy, ox = np.mgrid[0:s, 0:s].astype(np.float32)
    r = np.hypot(ox - s / 2, oy - s / 2) / (s / 2 - 4)
    shade = np.clip(1.15 - np.hypot(ox - s * 0.35, oy - s * 0.35) / s, 0.3, 1.0)
    ball = np.stack([230 * shade, 40 * shade, 40 * shade, np.clip((1.0 - r) * 40, 0, 1) * 255], -1)
    return background, Image.fromarray(ball.astype(np.uint8), "RGBA")


def demo_images() -> tuple[Image.Image, Image.Image, str]:
    """(background, RGBA object, a note saying where they come from)."""
    photos = _photographs()
    if photos is not None:
        return (*photos, "scikit-image's astronaut and coffee photographs")
    return (*_procedural(), "procedural images (install scikit-image for real photographs)")


def run_demo(out_dir: str | Path, *, generative: bool = False, steps: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write ``background.png``, ``object.png``, ``classic.png`` (and ``generative.png``) to ``out_dir``."""
    from composekit.compositor import Compositor
    from composekit.formats.atomic import save_image_atomic

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write the demo into {out}: it is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}; choose a writable folder") from None
    background, obj, _ = demo_images()
    paths = {"background": out / "background.png", "object": out / "object.png", "classic": out / "classic.png"}
    save_image_atomic(background, paths["background"])
    save_image_atomic(obj, paths["object"])
    save_image_atomic(Compositor().paste(obj, background, DEMO_BOX).image, paths["classic"])
    if generative:
        from composekit.apps.random_models import make_random_model

        model = out / "tiny-model"
        if not (model / "model_index.json").exists():
            make_random_model(model, "tiny", seed=0, overwrite=True)
        comp = Compositor.from_pretrained(model, device="cpu")
        result = comp.paste(obj, background, DEMO_BOX, steps=steps, seed=seed, progress=False)
        paths["generative"] = save_image_atomic(result.image, out / "generative.png")
        paths["model"] = model
    return paths
