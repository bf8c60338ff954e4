"""``method="classic"``: compositing with no model weights, in milliseconds on a CPU.

1. The object (its alpha, or the whole image when opaque) is scaled to fit the box, keeping its
   aspect, centred horizontally and standing on the box's bottom edge.
2. Colour harmonisation: in CIELAB, the object's per-channel mean
   and spread move ``harmonize`` of the way towards those of the background around the box — the
   classic mean/variance colour transfer, restricted to the object's pixels.
3. A soft contact shadow: a blurred ellipse under the object darkens the background, inside the box.
4. The object's edge is feathered inside its own alpha, and only the box is written: every pixel
   outside the region stays bit-identical, as with the generative method.

Only Pillow and numpy are used: resampling, drawing and blurring are Pillow's; the sRGB <-> CIELAB
conversion is the standard formula in numpy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from composekit.core.geometry import Box, feather_alpha

__all__ = ["classic_composite"]

# sRGB (D65) <-> CIELAB, in float: the published sRGB and CIE formulas. (Pillow's 8-bit LAB mode
# clips saturated a/b values, losing up to 40 levels on a round trip, so it is not used here.)
_M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]], np.float64)
_WHITE = _M.sum(axis=1)


def _lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (linear @ _M.T) / _WHITE
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _rgb(lab: np.ndarray) -> np.ndarray:
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    t = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    linear = np.clip(t @ np.linalg.inv(_M).T, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(c * 255.0), 0, 255).astype(np.uint8)


def _surroundings(bg: np.ndarray, box: Box) -> np.ndarray:
    """Background pixels in a ring around the box (half its size on each side), as N x 3."""
    h, w = bg.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = max((x1 - x0) // 2, 4), max((y1 - y0) // 2, 4)
    X0, Y0, X1, Y1 = max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w), min(y1 + my, h)
    s = max(1, int(np.sqrt((Y1 - Y0) * (X1 - X0) / 40000)))  # statistics from ~40k pixels at most
    area = bg[Y0:Y1:s, X0:X1:s]
    ys, xs = np.arange(Y0, Y1, s)[:, None], np.arange(X0, X1, s)[None, :]
    ring = ~((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))
    return area[ring] if ring.any() else area.reshape(-1, 3)


_LUT_SIZE = 33


def _harmonize(obj: np.ndarray, alpha: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """Per-channel Lab mean/spread transfer, applied through a 33^3 colour lookup table (Pillow)."""
    if strength <= 0 or reference.size == 0:
        return obj
    s = max(1, int(np.sqrt(alpha.size / 40000)))  # statistics from ~40k object pixels at most
    lab = _lab(obj[::s, ::s])
    weights = alpha[::s, ::s].astype(np.float64) / 255.0
    total = float(weights.sum())
    if total < 1:
        return obj
    ref = _lab(reference[None])[0]
    mu_o = (lab * weights[..., None]).sum((0, 1)) / total
    sd_o = np.sqrt((((lab - mu_o) ** 2) * weights[..., None]).sum((0, 1)) / total) + 1e-3
    mu_r, sd_r = ref.mean(0), ref.std(0) + 1e-3
    gain = 1.0 + strength * (np.clip(sd_r / sd_o, 0.5, 2.0) - 1.0)
    # The transfer is a fixed colour -> colour map: tabulate it once, apply it with Pillow's 3D LUT.
    axis = np.rint(np.linspace(0, 255, _LUT_SIZE)).astype(np.uint8)
    b, g, r = np.meshgrid(axis, axis, axis, indexing="ij")  # Pillow's table order: red varies fastest
    grid = np.stack([r, g, b], -1).reshape(1, -1, 3)
    moved = _rgb((_lab(grid) - mu_o) * gain + mu_o + strength * (mu_r - mu_o)).reshape(-1, 3) / 255.0
    lut = ImageFilter.Color3DLUT(_LUT_SIZE, moved.ravel().tolist())
    return np.asarray(Image.fromarray(obj).filter(lut))


def classic_composite(
    background: np.ndarray,
    obj: np.ndarray,
    obj_alpha: np.ndarray | None,
    box: Box,
    region: np.ndarray | None = None,
    *,
    harmonize: float = 0.5,
    shadow: float = 0.35,
    feather: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite ``obj`` into ``box`` of ``background``; returns (image, changed-pixel mask of the box).

    ``region`` (bool, box-shaped) further limits where pixels may change. ``harmonize`` (0..1) is
    the colour-transfer strength, ``shadow`` (0..1) the contact shadow's darkness, ``feather`` the
    soft edge in pixels.
    """
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    h, w = obj.shape[:2]
    alpha = np.full((h, w), 255, np.uint8) if obj_alpha is None else obj_alpha
    scale = min(bw / w, bh / h)
    ow, oh = max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))
    obj_s = np.asarray(Image.fromarray(obj).resize((ow, oh), Image.Resampling.LANCZOS))
    alpha_s = np.asarray(Image.fromarray(alpha).resize((ow, oh), Image.Resampling.LANCZOS))
    obj_s = _harmonize(obj_s, alpha_s, _surroundings(background, box), float(harmonize))

    # Object layer and its alpha on the box's canvas: centred, standing on the bottom edge.
    ox, oy = (bw - ow) // 2, bh - oh
    layer = np.zeros((bh, bw, 3), np.float32)
    layer[oy : oy + oh, ox : ox + ow] = obj_s
    a = np.zeros((bh, bw), np.float32)
    a[oy : oy + oh, ox : ox + ow] = alpha_s.astype(np.float32) / 255.0
    if feather > 0:
        a = a * feather_alpha(a > 0, feather)

    # Contact shadow: a blurred ellipse at the object's foot, darkening the background.
    dark = np.zeros((bh, bw), np.float32)
    if shadow > 0:
        sh = Image.new("L", (bw, bh), 0)
        ry = max(2, oh // 12)
        ImageDraw.Draw(sh).ellipse((ox + ow * 0.1, bh - 1 - 2 * ry, ox + ow * 0.9, bh - 1), fill=255)
        sh = sh.filter(ImageFilter.GaussianBlur(max(1.0, ry / 1.5)))
        dark = np.asarray(sh, np.float32) / 255.0 * float(shadow)

    allowed = np.ones((bh, bw), bool) if region is None else region.astype(bool)
    a = np.where(allowed, a, 0.0)
    dark = np.where(allowed, dark, 0.0)
    out = background.copy()
    target = out[y0:y1, x0:x1]
    base = target[..., :3].astype(np.float32) * (1.0 - dark[..., None])
    blended = np.clip(np.rint(base * (1.0 - a[..., None]) + layer * a[..., None]), 0, 255).astype(np.uint8)
    changed = (a > 0) | (dark > 0)
    target[..., :3][changed] = blended[changed]
    return out, changed
