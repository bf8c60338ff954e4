"""`composekit ui` in a real browser: headless Chromium (Debian's package) driven by Playwright.

The test uploads the demo's object and background, sets the box with two mouse clicks on the
background, runs, downloads the PNG and checks it equals `Compositor.paste` with the same inputs, box,
options and seed, bit for bit; a bad upload shows composekit's typed message, no traceback.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import composekit_process, free_port
from PIL import Image

from composekit import Compositor

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from composekit.apps.demo import demo_images

    root = tmp_path_factory.mktemp("ui-demo")
    background, obj, _ = demo_images()
    background.save(root / "background.png")
    obj.save(root / "object.png")
    (root / "broken.png").write_bytes(b"this is not an image")
    return root


@contextlib.contextmanager
def ui_server(*args):
    port = free_port()
    env = {"GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with composekit_process("ui", port, *args, env=env) as proc:
        yield f"http://127.0.0.1:{port}/", proc.log_lines


@contextlib.contextmanager
def browser():
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium.new_page(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        finally:
            chromium.close()


def _upload_and_click_box(page, demo, background="background.png"):
    page.locator("#object-file input[type=file]").set_input_files(str(demo / "object.png"))
    page.locator("#background-file input[type=file]").set_input_files(str(demo / background))
    image = page.locator("#background-view img")
    image.wait_for(timeout=60_000)
    area = image.bounding_box()
    box_field = page.locator("#box textarea, #box input").first
    # Two corners, in either order; each click is waited for by what it shows (the first: a one-pixel box).
    for fx, fy, check in ((0.72, 0.38, "v => v[2] - v[0] == 1"), (0.52, 0.6, "v => v[2] - v[0] > 1")):
        page.mouse.click(area["x"] + area["width"] * fx, area["y"] + area["height"] * fy)
        page.wait_for_function(f"el => {{ const v = el.value.split(',').map(Number); return v.length == 4 && "
                               f"({check})(v); }}", arg=box_field.element_handle(), timeout=30_000)
    return tuple(int(v) for v in box_field.input_value().split(","))


def _run_and_download(page, tmp_path):
    page.locator("#run").click()
    link = page.locator("#download a").first
    link.wait_for(timeout=300_000)
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "downloaded.png"
    download.value.save_as(path)
    return np.asarray(Image.open(path)), page.locator("#status").inner_text()


def test_classic_composite_by_mouse_equals_the_api(demo, tmp_path):
    with ui_server() as (url, _), browser() as page:
        page.goto(url)
        box = _upload_and_click_box(page, demo)
        got, status = _run_and_download(page, tmp_path)
    x0, y0, x1, y1 = box
    assert x1 - x0 > 50 and y1 - y0 > 50, box  # the clicks made a real box
    expected = Compositor().paste(str(demo / "object.png"), str(demo / "background.png"), box).image
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert "classic composite" in status and "Traceback" not in status


def test_generative_composite_by_mouse_equals_the_api(demo, tmp_path, tiny_model_dir):
    with ui_server("--model", tiny_model_dir, "--device", "cpu") as (url, _), browser() as page:
        page.goto(url)
        box = _upload_and_click_box(page, demo)
        page.locator("#option-steps input").fill("3")
        page.locator("#seed textarea, #seed input").first.fill("7")
        got, status = _run_and_download(page, tmp_path)
    comp = Compositor.from_pretrained(tiny_model_dir, device="cpu")
    expected = comp.paste(str(demo / "object.png"), str(demo / "background.png"), box, steps=3, seed=7,
                          progress=False).image
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert "seed 7" in status.replace("*", "")


def test_a_bad_upload_shows_the_typed_message(demo, tmp_path):
    with ui_server() as (url, _), browser() as page:
        page.goto(url)
        page.locator("#object-file input[type=file]").set_input_files(str(demo / "object.png"))
        page.locator("#background-file input[type=file]").set_input_files(str(demo / "broken.png"))
        page.locator("#box textarea, #box input").first.fill("10,10,60,60")
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('error')",
                               timeout=60_000)
        text = page.locator("#status").inner_text()
        page.screenshot(path=str(tmp_path / "error.png"))
    assert "not a readable image" in text and "Traceback" not in text


def test_import_composekit_imports_no_gradio():
    code = "import sys, composekit, composekit.apps.cli; print(any(m.split('.')[0] == 'gradio' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
