"""The weights-free classic method on real photographs (scikit-image's sample images)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from composekit import Compositor, InputError
from composekit.core.classic import _lab, _rgb

data = pytest.importorskip("skimage.data", reason="scikit-image provides the real example photographs")


@pytest.fixture(scope="module")
def photos():
    from composekit.apps.demo import demo_images

    background, cup, source = demo_images()
    assert "scikit-image" in source
    return background, cup


def test_background_outside_the_region_is_untouched(photos):
    background, cup = photos
    before = np.asarray(background).copy()
    r = Compositor().paste(cup, background, (380, 208, 504, 300))
    out = np.asarray(r.image)
    np.testing.assert_array_equal(out[~r.mask], before[~r.mask])
    np.testing.assert_array_equal(np.asarray(background), before)  # the caller's image is untouched
    assert r.mask[208:300, 380:504].mean() > 0.3 and not r.mask[:208].any() and not r.mask[:, :380].any()
    assert r.steps == 0 and r.timings["total"] > 0


def test_large_background_and_other_photographs():
    bg = np.asarray(Image.fromarray(data.chelsea()).resize((4000, 3000)))
    obj = data.rocket()  # opaque: the whole (scaled) image is pasted
    r = Compositor().paste(obj, bg, (2200, 1000, 3200, 2400))
    np.testing.assert_array_equal(r.image[~r.mask], bg[~r.mask])
    # The object keeps its aspect: 640x427 scaled into 1000x1400 -> 1000 wide, ~667 tall, on the bottom.
    rows = np.nonzero(r.mask[:, 2700])[0]
    assert 1400 - 5 <= rows.max() - 1000 + 1 <= 1400 and rows.min() - 1000 > 600


def test_harmonization_moves_colours_towards_the_surroundings(photos):
    background, cup = photos
    dark = np.zeros((400, 400, 3), np.uint8)
    dark[...] = (20, 30, 90)  # a dark blue scene
    box = (100, 100, 300, 300)
    plain = Compositor().paste(cup, dark, box, harmonize=0.0, shadow=0.0)
    tuned = Compositor().paste(cup, dark, box, harmonize=1.0, shadow=0.0)
    m = plain.mask & tuned.mask
    lab_plain = _lab(np.asarray(plain.image)[m][None])[0].mean(0)
    lab_tuned = _lab(np.asarray(tuned.image)[m][None])[0].mean(0)
    target = _lab(np.array([[[20, 30, 90]]], np.uint8))[0, 0]
    assert np.linalg.norm(lab_tuned - target) < np.linalg.norm(lab_plain - target) - 10


def test_shadow_darkens_below_the_object_inside_the_box():
    bg = np.full((200, 200, 3), 200, np.uint8)
    obj = np.zeros((50, 50, 4), np.uint8)
    obj[10:40, 10:40] = (250, 20, 20, 255)
    with_shadow = Compositor().paste(obj, bg, (50, 50, 150, 150), shadow=0.8)
    without = Compositor().paste(obj, bg, (50, 50, 150, 150), shadow=0.0)
    assert with_shadow.mask.sum() > without.mask.sum()
    foot = np.asarray(with_shadow.image)[147, 100]
    assert foot.max() < 200 and not (with_shadow.mask & ~np.pad(np.ones((100, 100), bool), 50)).any()


def test_lab_round_trip_is_exact():
    x = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(_lab(x)), x)
    np.testing.assert_allclose(_lab(np.array([[[255, 0, 0]]], np.uint8))[0, 0], [53.24, 80.09, 67.20], atol=0.01)


def test_classic_errors_and_generative_without_model():
    bg = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(InputError, match="from_pretrained"):
        Compositor().paste(bg, bg, (0, 0, 10, 10), method="generative")
    with pytest.raises(InputError, match="harmonize"):
        Compositor().paste(bg, bg, (0, 0, 10, 10), harmonize=2)
    with pytest.raises(InputError, match="method"):
        Compositor().paste(bg, bg, (0, 0, 10, 10), method="magic")
    assert "classic" in repr(Compositor())


def test_cli_paste_without_a_model_and_stdin_stdout(tmp_path):
    Image.fromarray(data.chelsea()).save(tmp_path / "bg.png")
    Image.fromarray(data.coffee()).save(tmp_path / "cup.jpg")
    proc = subprocess.run([sys.executable, "-m", "composekit", "paste", tmp_path / "cup.jpg", tmp_path / "bg.png",
                           "--box", "20,150,200,290", "-o", tmp_path / "out.png"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "classic" in proc.stdout and "--model" in proc.stdout
    assert Image.open(tmp_path / "out.png").size == (451, 300)
    # Background from standard input, PNG to standard output, messages on standard error.
    proc = subprocess.run([sys.executable, "-m", "composekit", "paste", str(tmp_path / "cup.jpg"), "-", "--box",
                           "20,150,200,290", "-o", "-"], input=(tmp_path / "bg.png").read_bytes(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    out = Image.open(__import__("io").BytesIO(proc.stdout))
    assert out.size == (451, 300) and b"classic" in proc.stderr
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(tmp_path / "out.png")))


def test_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "composekit", "demo", tmp_path / "demo"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "classic.png").exists() and "Fantasy-Studio/Paint-by-Example" in proc.stdout
