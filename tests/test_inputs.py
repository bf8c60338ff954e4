"""Untrusted inputs: image modes and formats, bombs, masks, numerics; every failure typed, nothing modified.

The property test drives the real tiny model through random background sizes, boxes (valid and not)
and image modes: each call returns an image whose outside-of-region pixels equal the background's,
or raises a ComposekitError — nothing else.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from composekit import ComposekitError, InputError, NumericalError
from composekit.formats.images import load_picture, set_max_pixels, to_caller_kind

ONE = dict(steps=1, guidance=1.0, progress=False, seed=0)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that carries no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = _png_header_only(40_000, 40_000)  # 1.6 gigapixels claimed, 45 bytes on disk
    with pytest.raises(InputError, match="refused before decoding"):
        load_picture(bomb, "background")
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(InputError, match="refused before decoding"):
        load_picture(path, "background")
    # Under Pillow's hard limit but over composekit's: composekit's check refuses it.
    with pytest.raises(InputError, match="over the limit of 89,478,485"):
        load_picture(_png_header_only(12_000, 10_000))


def test_pixel_limit_is_configurable():
    data = _encode(gradient_background(100, 100), "PNG")
    try:
        set_max_pixels(5_000)
        with pytest.raises(InputError, match="5,000"):
            load_picture(data)
        set_max_pixels(10_000)
        assert load_picture(data).width == 100
    finally:
        set_max_pixels(89_478_485)
    with pytest.raises(InputError):
        set_max_pixels(0)


def test_formats_outside_the_allow_list_are_refused_whatever_the_name(tmp_path):
    gif = _encode(gradient_background(20, 20), "GIF")
    (tmp_path / "looks.png").write_bytes(gif)
    for source in (gif, tmp_path / "looks.png"):
        with pytest.raises(InputError, match="allowed format"):
            load_picture(source)
    ico = _encode(gradient_background(16, 16), "ICO")
    with pytest.raises(InputError):
        load_picture(ico)


def test_exif_orientation_is_applied_to_files():
    img = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    pic = load_picture(_encode(img, "JPEG", exif=exif, quality=100))
    assert (pic.width, pic.height) == (4, 6)


def test_first_frame_of_animations():
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    pic = load_picture(buf.getvalue())
    assert tuple(pic.rgb[0, 0]) == (200, 0, 0)


@pytest.mark.parametrize(
    "make,mode,alpha",
    [
        (lambda: Image.new("P", (8, 8), 1), "RGB", False),
        (lambda: _transparent_p(), "RGBA", True),
        (lambda: Image.new("LA", (8, 8), (100, 50)), "RGBA", True),
        (lambda: Image.new("L", (8, 8), 100), "L", False),
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "RGB", False),
        (lambda: Image.new("I;16", (8, 8), 65535), "L", False),
        (lambda: Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"), "L", False),
    ],
)
def test_modes_are_converted_deliberately(make, mode, alpha):
    img = make()
    pic = load_picture(img)
    assert pic.rgb.shape == (8, 8, 3) and pic.rgb.dtype == np.uint8
    assert pic.mode == mode and (pic.alpha is not None) == alpha


def test_16_bit_and_float_are_scaled_not_clipped():
    assert load_picture(Image.new("I;16", (2, 2), 65535)).rgb.max() == 255
    assert load_picture(Image.new("I;16", (2, 2), 32896)).rgb.max() == 128  # clipping would give 255
    assert load_picture(np.full((2, 2, 3), 65535, np.uint16)).rgb.max() == 255
    assert load_picture(np.full((2, 2, 3), 0.5, np.float32)).rgb.max() == 128
    with pytest.raises(InputError, match="0..1"):
        load_picture(np.full((2, 2, 3), 1.5, np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_picture(np.full((2, 2, 3), np.nan, np.float32))


def _transparent_p() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.info["transparency"] = 0
    return img


def test_alpha_is_kept_straight():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 10  # nearly transparent but full-strength colour
    pic = load_picture(arr)
    assert pic.rgb[0, 0, 0] == 200 and pic.alpha[0, 0] == 10


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((64, 64), bool),  # all zero
        np.ones((32, 64), bool),  # wrong size
        np.zeros((64, 64, 2), np.uint8),  # wrong shape
        Image.new("L", (64, 64), 0),
    ],
)
def test_bad_masks(compositor, mask):
    bg = gradient_background(64, 64)
    before = np.asarray(bg).copy()
    mask_before = np.array(mask, copy=True)
    with pytest.raises(InputError):
        compositor.paste(noise_object(), bg, mask=mask, **ONE)
    np.testing.assert_array_equal(np.asarray(bg), before)
    np.testing.assert_array_equal(np.asarray(mask), mask_before)


def test_bool_mask_is_accepted(compositor):
    m = np.zeros((64, 64), bool)
    m[10:30, 20:50] = True
    r = compositor.paste(noise_object(), gradient_background(64, 64), mask=m, **ONE)
    assert r.box == (20, 10, 50, 30) and not (r.mask & ~m).any()


def test_non_finite_values_are_a_numerical_error(compositor, monkeypatch):
    backend = compositor.backend
    real = backend.decode

    def broken(latents, tiny=False):
        out = real(latents, tiny=tiny)
        return out * float("nan")

    monkeypatch.setattr(backend, "decode", broken)
    bg = gradient_background(64, 64)
    with pytest.raises(NumericalError, match="NaN"):
        compositor.paste(noise_object(), bg, (8, 8, 40, 40), **ONE)


# --- the property test ---------------------------------------------------------------------------

MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "F")


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I;16", "F"):
        base = np.asarray(rgb.convert("L"))
        return (Image.fromarray(base.astype(np.uint16) * 257) if mode == "I;16"
                else Image.fromarray(base.astype(np.float32) / 255.0, "F"))
    return rgb.convert(mode)


box_value = st.one_of(st.integers(-20, 300), st.sampled_from([float("nan"), float("inf"), 2.5, True]))


@st.composite
def valid_box(draw, w: int, h: int):
    x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    return x0, y0, draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(w=st.integers(1, 260), h=st.integers(1, 260), mode=st.sampled_from(MODES), obj_mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16), data=st.data())
def test_every_call_keeps_the_background_or_raises_a_composekit_error(compositor, w, h, mode, obj_mode, seed, data):
    box = data.draw(st.one_of(
        valid_box(w, h),  # about half the cases composite
        st.tuples(box_value, box_value, box_value, box_value),
        st.lists(st.integers(0, 50), max_size=5),
    ), label="box")
    bg = _image(mode, w, h, seed)
    obj = _image(obj_mode, 24, 30, seed + 1)
    bg_before = np.asarray(bg).copy()
    try:
        r = compositor.paste(obj, bg, box, **ONE)
    except ComposekitError:
        event("raised a composekit error")
        np.testing.assert_array_equal(np.asarray(bg), bg_before)
        return
    event("composited")
    out = np.asarray(r.image)
    if bg.mode in ("RGB", "RGBA", "L"):
        reference = bg_before  # these modes come back as they went in, pixel for pixel
    else:
        # Other modes come back converted by the documented rule (composekit.formats.images): the background
        # as composekit reads it, returned unchanged.
        pic = load_picture(bg)
        reference = np.asarray(to_caller_kind(pic.rgb, pic))
    assert out.shape == reference.shape
    np.testing.assert_array_equal(out[~r.mask], reference[~r.mask])
    np.testing.assert_array_equal(np.asarray(bg), bg_before)
