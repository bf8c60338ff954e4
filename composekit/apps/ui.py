"""``composekit ui``: a Gradio app to try composites with the mouse.

Upload an object (a cut-out keeps its alpha) and a background, click two corners of the box on the
background, set the options (generated from the one option schema, with their help texts) and run.
The result is shown beside the background with the edited region outlined, with its timings and seed,
and offered as a PNG download that is exactly ``Compositor.paste``'s image for the same inputs, box,
options and seed. Errors are shown as composekit's typed messages, never as a traceback.

Uploads are taken as files (their bytes as sent, not re-encoded by the browser widget), so a composite
made here equals the Python API's bit for bit. Binds 127.0.0.1 unless told otherwise; ``auth`` (user,
password) puts Gradio's login in front. Needs the ``ui`` extra (Gradio). The composites and the demo's
example files live in one temporary folder that is removed when the app stops (Ctrl-C or SIGTERM).
"""

# No `from __future__ import annotations`: Gradio reads the event handlers' annotations (gr.SelectData).
import logging
import os
import shutil
import signal
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from composekit.core.options import SEED, PasteOptions, Spec
from composekit.errors import BackendUnavailableError, ComposekitError, install_hint

__all__ = ["build_app", "run"]

logger = logging.getLogger(__name__)

OUTLINE = (255, 0, 160)  # the colour of the edited region's outline in the preview


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    try:
        import gradio as gr
    except ImportError as exc:
        raise BackendUnavailableError(f"composekit ui needs Gradio; {install_hint('ui')}") from exc
    return gr


def _control(gr: Any, spec: Spec) -> Any:
    """The widget of one declared option: a dropdown for choices, a number otherwise (empty = its default)."""
    label, elem = spec.name.replace("_", " "), f"option-{spec.name}"
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label, info=spec.describe(), elem_id=elem)
    if spec.kind is bool:
        return gr.Checkbox(value=spec.default, label=label, info=spec.help, elem_id=elem)
    if spec.nullable:  # empty = None (the option's automatic value); a number widget would show 0
        return gr.Textbox(value="", label=label, info=spec.describe() + "; empty = automatic", elem_id=elem)
    precision = 0 if spec.kind is int else None
    return gr.Number(value=spec.default, label=label, info=spec.describe(), precision=precision, minimum=spec.lo,
                     maximum=spec.hi, elem_id=elem)


def _box_text(clicks: list[list[int]]) -> str:
    """The box through two clicked corners (any order), as "x0,y0,x1,y1" with x1, y1 exclusive; after the first
    click, the one-pixel box at that corner (so the field shows the click was taken)."""
    (ax, ay), (bx, by) = clicks if len(clicks) == 2 else clicks * 2
    return f"{min(ax, bx)},{min(ay, by)},{max(ax, bx) + 1},{max(ay, by) + 1}"


def _outlined(image: Any, mask: np.ndarray) -> np.ndarray:
    """The composite as RGB with the edge of the edited region drawn over it (preview only)."""
    rgb = np.asarray(image.convert("RGB")).copy()
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    rgb[mask & ~inner] = OUTLINE
    return rgb


def build_app(compositor: Any, examples: list[list[str]] | None = None, out_dir: Path | None = None) -> Any:
    """The Gradio Blocks app for ``compositor`` (a model, or none: the classic method).

    Composites are written to ``out_dir``; without one, to a temporary folder removed with the app."""
    gr = _gradio()
    from composekit.core.geometry import parse_box
    from composekit.formats.atomic import save_image_atomic
    from composekit.formats.images import load_picture

    method = "generative" if compositor.backend is not None else "classic"
    specs = {name: spec for name, spec in PasteOptions.specs().items() if spec.cli and method in spec.methods}
    own_dir = out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="composekit-ui-")) if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    what = f"model {compositor.backend.info.source}" if compositor.backend is not None else \
        "no model: the weights-free classic method"

    with gr.Blocks(title="composekit") as app:
        gr.Markdown(f"## composekit\nPaste an object into a background so it belongs ({what}). Click two corners "
                    "of the box on the background, or type it.")
        clicks = gr.State([])
        with gr.Row():
            with gr.Column():
                obj_file = gr.File(label="object (PNG with transparency = a cut-out)", file_types=["image"],
                                   elem_id="object-file")
                bg_file = gr.File(label="background", file_types=["image"], elem_id="background-file")
                bg_view = gr.Image(label="background: click two corners of the box", interactive=False,
                                   type="numpy", elem_id="background-view")
                box = gr.Textbox(label="box", info="x0,y0,x1,y1 in background pixels (x1, y1 exclusive)",
                                 elem_id="box")
            with gr.Column():
                seed = gr.Textbox(label="seed", value="0" if method == "generative" else "",
                                  info=SEED.describe() if method == "generative" else "the classic method draws no "
                                  "noise", interactive=method == "generative", elem_id="seed")
                controls = {name: _control(gr, spec) for name, spec in specs.items()}
                run_button = gr.Button("Composite", variant="primary", elem_id="run")
        with gr.Row():
            preview = gr.Image(label="result (edited region outlined)", interactive=False, elem_id="result")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="download the composite (PNG)", interactive=False, elem_id="download")
        if examples:
            gr.Examples(examples, inputs=[obj_file, bg_file, box], label="the demo's photographs")

        def show_background(path: str | None) -> tuple[Any, list, str]:
            if not path:
                return None, [], ""
            try:
                return load_picture(path, "background").rgb, [], ""
            except ComposekitError as exc:
                raise gr.Error(str(exc)) from None

        def clicked(points: list, event: gr.SelectData) -> tuple[list, str | Any]:
            points = [*points, [int(event.index[0]), int(event.index[1])]][-2:]
            return points, _box_text(points)

        def composite(obj_path: str | None, bg_path: str | None, box_text: str, seed_text: str, *values: Any,
                      progress: Any = gr.Progress()) -> tuple[Any, str, Any]:
            try:
                if not obj_path or not bg_path:
                    return None, "**error:** upload an object and a background", None
                options = {name: spec.parse(value.strip()) if isinstance(value, str) and value.strip()
                           else spec.check(spec.default if value in ("", None) else value)
                           for (name, spec), value in zip(specs.items(), values)}
                options = {k: v for k, v in options.items() if v != specs[k].default}
                seed_value = SEED.parse(seed_text.strip()) if seed_text and seed_text.strip() else None
                steps = options.get("steps", specs["steps"].default) if "steps" in specs else 0

                def step(i: int, t: int, latents: Any) -> None:
                    progress((i + 1) / max(steps, 1), desc=f"step {i + 1}/{steps}")

                extra = {"seed": seed_value, "callback": step} if method == "generative" else {}
                result = compositor.paste(obj_path, bg_path, parse_box(box_text.strip()), progress=False, **extra,
                                          **options)
                path = out_dir / f"composite-{len(list(out_dir.iterdir()))}.png"
                save_image_atomic(result.image, path)
                timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
                seed_note = f"seed **{result.seed}**, " if result.seed is not None else ""
                return (_outlined(result.image, result.mask),
                        f"{result.method} composite: {seed_note}box {result.box}; {timings}", str(path))
            except ComposekitError as exc:
                return None, f"**error:** {exc}", None

        bg_file.change(show_background, bg_file, [bg_view, clicks, box])
        bg_view.select(clicked, clicks, [clicks, box])
        run_button.click(composite, [obj_file, bg_file, box, seed, *controls.values()], [preview, status, download])
    if own_dir:  # removed when the app is collected, or at the latest when the interpreter exits
        weakref.finalize(app, shutil.rmtree, out_dir, ignore_errors=True)
    return app


def demo_examples(folder: Path) -> list[list[str]]:
    """The demo's photographs (object, background, box) as files in ``folder``, when scikit-image is installed."""
    try:
        from composekit.apps.demo import DEMO_BOX, demo_images
    except ImportError:
        return []
    try:
        background, obj, _ = demo_images()
    except (ImportError, ComposekitError):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    background.save(folder / "background.png")
    obj.save(folder / "object.png")
    return [[str(folder / "object.png"), str(folder / "background.png"), ",".join(map(str, DEMO_BOX))]]


def run(compositor: Any, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
        on_ready: Any = None) -> None:
    """Serve the app until interrupted (Ctrl-C, or SIGTERM as sent by ``kill``, systemd or ``docker stop``); the
    temporary folder of its composites and examples is removed either way."""
    with tempfile.TemporaryDirectory(prefix="composekit-ui-") as scratch:
        app = build_app(compositor, demo_examples(Path(scratch) / "examples"), out_dir=Path(scratch) / "out")
        app.queue(default_concurrency_limit=1)  # one composite at a time: the model is shared
        app.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=True, quiet=True,
                   show_error=False)
        previous = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops the app as Ctrl-C does

            def interrupt(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            if on_ready is not None:
                on_ready(app.server_port)
            app.block_thread()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            app.close()
