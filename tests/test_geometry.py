"""Box validation, context windows, the latent-aligned hole and the paste-back guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest

from composekit.core import geometry
from composekit.errors import InputError


@pytest.mark.parametrize(
    "box",
    [
        (10, 10, 5, 20),  # inverted x
        (10, 10, 20, 10),  # zero height
        (-1, 0, 10, 10),  # negative
        (0, 0, 101, 10),  # past the right edge
        (0, 0, 10, 51),  # past the bottom edge
        (0, 0, 10),  # wrong length
        (0, 0, 10, 10, 3),
        (0, 0, float("nan"), 10),
        (0, 0, float("inf"), 10),
        (0, 0, 10.5, 10),  # fractional
        (True, 0, 10, 10),  # booleans are not coordinates
        ("0", 0, 10, 10),
        None,
        5,
    ],
)
def test_bad_boxes_are_input_errors(box):
    with pytest.raises(InputError):
        geometry.validate_box(box, 100, 50)


def test_good_box_accepts_numpy_and_integral_floats():
    assert geometry.validate_box(np.array([1, 2, 30, 40]), 100, 50) == (1, 2, 30, 40)
    assert geometry.validate_box((1.0, 2.0, 30.0, 40.0), 100, 50) == (1, 2, 30, 40)
    assert geometry.validate_box((0, 0, 100, 50), 100, 50) == (0, 0, 100, 50)


@pytest.mark.parametrize(
    "size,box",
    [((4000, 3000), (1500, 1200, 1900, 1800)), ((1000, 5), (10, 0, 600, 5)), ((5, 1000), (0, 900, 5, 1000)),
     ((64, 64), (0, 0, 64, 64)), ((300, 200), (0, 0, 10, 10)), ((37, 101), (3, 50, 30, 90))],
)
def test_window_contains_box_and_stays_inside_where_it_fits(size, box):
    w, h = size
    win = geometry.plan_window(box, w, h, 64, context=2.0)
    x0, y0, x1, y1 = box
    assert win.x <= x0 and win.y <= y0 and win.x + win.side >= x1 and win.y + win.side >= y1
    for start, extent in ((win.x, w), (win.y, h)):
        if win.side <= extent:
            assert 0 <= start and start + win.side <= extent
        else:  # the window covers the whole extent, padded on both sides
            assert start <= 0 and start + win.side >= extent
    assert win.side <= max(w, h)


def test_model_sized_background_is_used_whole_without_resize():
    win = geometry.plan_window((10, 10, 20, 20), 64, 64, 64)
    assert (win.x, win.y, win.side) == (0, 0, 64) and win.identity
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(geometry.crop_window(img, win), img)


def test_crop_pads_with_edge_pixels_and_does_not_modify_input():
    img = np.random.default_rng(0).integers(0, 256, (5, 40, 3), dtype=np.uint8)
    before = img.copy()
    win = geometry.Window(x=0, y=-10, side=25, model_size=25)
    crop = geometry.crop_window(img, win)
    assert crop.shape == (25, 25, 3)
    np.testing.assert_array_equal(crop[10:15], img[:, :25])
    np.testing.assert_array_equal(crop[0], img[0, :25])
    np.testing.assert_array_equal(img, before)


def test_hole_is_grid_aligned_and_covers_the_box():
    win = geometry.plan_window((13, 7, 50, 41), 64, 64, 64)
    hole = geometry.model_hole((13, 7, 50, 41), win, 8)
    assert hole.shape == (64, 64)
    assert hole[7:41, 13:50].all()  # every box pixel is regenerated
    cells = hole.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
    assert set(np.unique(cells.std(axis=1))) == {0.0}  # constant within every 8x8 cell
    assert hole[:, :8].sum() == 0 and hole[48:].sum() == 0


def test_hole_follows_a_mask_inside_the_box():
    win = geometry.Window(0, 0, 64, 64)
    region = np.zeros((32, 32), bool)
    region[:8, :8] = True  # only the top-left cell of the box
    hole = geometry.model_hole((16, 16, 48, 48), win, 8, region)
    assert hole.sum() == 64 and hole[16:24, 16:24].all()


@pytest.mark.parametrize("radius", [0, 1, 3, 8])
def test_feather_is_zero_outside_and_one_deep_inside(radius):
    region = np.zeros((40, 50), bool)
    region[5:35, 10:45] = True
    alpha = geometry.feather_alpha(region, radius)
    assert alpha.dtype == np.float32 and alpha.shape == region.shape
    assert (alpha[~region] == 0).all()
    # Every edge pixel but the extreme corners blends in a little; deep inside is fully generated.
    assert (alpha[5, 10 + radius : 45 - radius] > 0).all() and (alpha[5 + radius : 35 - radius, 10] > 0).all()
    assert alpha[20, 27] == 1.0
    if radius:
        assert alpha[5, 27] < 1.0  # the edge is soft
        assert math.isclose(alpha[5 + radius, 27], 1.0)


def test_paste_back_writes_only_where_alpha_is_positive():
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    before = bg.copy()
    box = (20, 30, 70, 100)
    win = geometry.plan_window(box, 90, 120, 64)
    gen = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    region = np.ones((70, 50), bool)
    alpha = geometry.feather_alpha(region, 4)
    out = geometry.paste_back(bg, gen, win, box, alpha)
    np.testing.assert_array_equal(bg, before)
    changed = (out != bg).any(axis=2)
    allowed = np.zeros(changed.shape, bool)
    allowed[30:100, 20:70] = alpha > 0
    assert not (changed & ~allowed).any()
    assert changed[50:80, 30:60].mean() > 0.9


def test_empty_mask_is_an_input_error():
    with pytest.raises(InputError):
        geometry.mask_to_box(np.zeros((4, 4), bool))


def test_out_of_bounds_box_suggests_only_valid_boxes():
    from composekit import InputError
    from composekit.core.geometry import validate_box

    with pytest.raises(InputError, match=r"clip it, e.g. \(600, 10, 640, 100\)"):
        validate_box((600, 10, 700, 100), 640, 480)
    with pytest.raises(InputError, match="does not overlap the background") as info:
        validate_box((700, 10, 800, 100), 640, 480)
    assert "e.g." not in str(info.value)  # no suggestion of an invalid box such as (700, 10, 640, 100)
