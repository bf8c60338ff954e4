"""Hostile and unlucky inputs, round 2: every one raises a ComposekitError subclass with a fix, in bounded
time and memory; model directories, exports and engines under generated mutations (property tests).

The input property test (500 cases) lives in test_inputs.py; the mutation tests here add 250 model
directory, 150 export and 100 engine-directory cases: 1,000 generated cases per run in all.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from composekit import ComposekitError, Compositor, InputError, ModelError
from composekit.formats.images import load_picture

FAST = dict(steps=1, guidance=1.0, progress=False, seed=0)
CASE_SECONDS = 20.0  # no generated case may take longer than this (catches hangs on FIFOs, devices, bombs)


def _raises_within(fn, exc=ComposekitError, seconds=CASE_SECONDS, match=None):
    """Run ``fn`` in a thread; it must raise ``exc`` (matching ``match``) within ``seconds``."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:  # surfaced below
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    error = box.get("error")
    assert isinstance(error, exc), f"expected {exc.__name__}, got {type(error).__name__}: {error}"
    if match:
        assert match in str(error), str(error)
    return error, time.perf_counter() - start


# -- image metadata and modes -----------------------------------------------------------------------


def _malformed_exif() -> bytes:
    """TIFF EXIF block: Orientation = 6 (SHORT) and ImageWidth stored as ASCII (a mistyped tag)."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x0100, 2, 3, b"ab\x00\x00")]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, c) + v for t, k, c, v in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_malformed_exif_with_an_orientation(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 4)).save(buf, fmt, exif=(b"Exif\x00\x00" if fmt == "JPEG" else b"") + _malformed_exif())
    with pytest.raises(InputError, match="malformed EXIF.*re-save"):
        load_picture(buf.getvalue(), "object")


def test_la_mode_is_converted_not_refused():
    pic = load_picture(Image.new("La", (5, 3), (100, 128)))  # premultiplied L + alpha
    assert pic.mode == "RGBA" and pic.rgb.shape == (3, 5, 3) and (pic.alpha == 128).all()
    assert abs(int(pic.rgb[0, 0, 0]) - 199) <= 1  # 100 * 255 / 128, un-premultiplied


def test_closed_pil_image():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.close()
    with pytest.raises(InputError, match="cannot be read"):
        load_picture(img, "object")


@pytest.mark.parametrize("arr", [np.zeros((0, 5, 3), np.float32), np.zeros((4, 0), np.float64),
                                 np.zeros((0, 0, 4), np.uint16)])
def test_zero_size_arrays(arr):
    with pytest.raises(InputError, match="empty"):
        load_picture(arr, "background")


# -- numbers at the edges ---------------------------------------------------------------------------


@pytest.mark.parametrize("box,match", [
    ((10**30, 0, 10**31, 5), "outside"), ((0, 0, 2**70, 10), "outside"), ((Fraction(1, 3), 0, 10, 10), "whole pixels"),
    ((Fraction(10**400, 1), 0, 10, 10), "out of range"), ((0, 0, np.int64(2**62), 10), "outside"),
])
def test_boxes_with_huge_or_odd_numbers(compositor, box, match):
    with pytest.raises(InputError, match=match):
        compositor.paste(noise_object(), gradient_background(64, 64), box, **FAST)


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=1e308), "context"), (dict(context=float("inf")), "context"), (dict(feather=10**9), "feather"),
    (dict(steps=1000), "schedule allows"), (dict(steps=10**20), "steps"), (dict(latents="noise"), "latents"),
    (dict(latents=[[1.0]]), "latents"), (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "NaN"),
    (dict(guidance=1e300), "guidance"), (dict(margin=10**9, region="silhouette"), "margin"),
    (dict(seed=True), "seed"), (dict(fidelity_factor=10**6, fidelity=0.5), "fidelity_factor"),
])
def test_numbers_at_the_edges(compositor, kwargs, match):
    opts = dict(FAST)
    opts.update(kwargs)
    _raises_within(lambda: compositor.paste(noise_object(), gradient_background(64, 64), (8, 8, 40, 40), **opts),
                   InputError, match=match)


def test_a_wide_feather_stays_within_bounded_memory():
    bg = np.asarray(gradient_background(1200, 1000))
    tracemalloc.start()
    try:
        r = Compositor().paste(noise_object(), bg, (0, 0, 1200, 1000), feather=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"  # the 1.2 MP box: ~10 float64 copies, not (1200+8192)^2
    np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], bg[~r.mask])


# -- memory bombs that pass the pixel limit ---------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_a_thin_object_is_refused_before_it_allocates(compositor):
    thin = _png(np.zeros((1, 40_000, 3), np.uint8))
    assert len(thin) < 1000  # a few hundred bytes on disk
    tracemalloc.start()
    try:
        _raises_within(lambda: compositor.paste(thin, gradient_background(64, 64), (8, 8, 40, 40), **FAST),
                       InputError, match="50:1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6
    cut = np.zeros((400, 400, 4), np.uint8)
    cut[200, :, 3] = 255  # a visible part of one row: 400:1 once tightened
    _raises_within(lambda: compositor.paste(cut, gradient_background(64, 64), (8, 8, 40, 40), **FAST),
                   InputError, match="visible part")


def test_a_thin_background_cannot_ask_for_a_huge_window(compositor):
    strip = _png(np.zeros((1, 40_000, 3), np.uint8))
    _raises_within(lambda: compositor.paste(noise_object(), strip, (0, 0, 40_000, 1), **FAST), InputError,
                   match="context window")


# -- model directories ------------------------------------------------------------------------------


@pytest.fixture()
def model(tmp_path, tiny_model_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _edit(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _load(root, **kw):
    return Compositor.from_pretrained(root, device="cpu", **kw)


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage_header", "header_past_end"])
def test_truncated_or_empty_safetensors(model, how):
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "garbage_header": struct.pack("<Q", 20) + b"{not json" + b" " * 11 + data[100:200],
                      "header_past_end": struct.pack("<Q", 10**12) + data[8:100]}[how])
    _raises_within(lambda: _load(model), ModelError, match="re-download")


def test_a_directory_named_like_a_weight_file(model):
    path = model / "vae" / "diffusion_pytorch_model.safetensors"
    path.unlink()
    path.mkdir()
    _raises_within(lambda: _load(model), ModelError, match="no weight file")


@pytest.mark.parametrize("file,change,match", [
    ("model_index.json", {"_class_name": ["x"]}, "_class_name"),
    ("model_index.json", {"cutout_backdrop": [1, 2]}, "cutout_backdrop"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps"),
    ("scheduler/scheduler_config.json", {"steps_offset": 10**9}, "steps_offset"),
    ("scheduler/scheduler_config.json", {"beta_start": "0.1"}, "beta_start"),
    ("feature_extractor/preprocessor_config.json", {"resample": 99}, "resample"),
    ("feature_extractor/preprocessor_config.json", {"size": {"shortest_edge": 0}}, "size"),
    ("feature_extractor/preprocessor_config.json", {"image_std": [0, 1, 1]}, "image_std"),
    ("unet/config.json", {"sample_size": 0}, "sample_size"),
    ("unet/config.json", {"in_channels": "9"}, "in_channels"),
    ("unet/config.json", {"block_out_channels": "wide"}, "block_out_channels"),
    ("vae/config.json", {"block_out_channels": []}, "block_out_channels"),
    ("vae/config.json", {"scaling_factor": -1}, "scaling_factor"),
    ("image_encoder/config.json", {"hidden_size": None}, "hidden_size"),
])
def test_configs_with_wrong_types_or_impossible_values(model, file, change, match):
    _edit(model / file, **change)
    error, _ = _raises_within(lambda: _load(model), ModelError, match=match)
    assert str(model) in str(error)  # names the file


def _refuse_weight_loads(monkeypatch, file: str) -> None:
    """Fail the test if the component ``file`` configures is built with real weights (its class's
    ``from_pretrained``): a config it describes must be refused before that."""
    import diffusers

    from composekit.backends.torch_backend import image_encoder_class

    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL, "image_encoder": image_encoder_class(),
           "taesd": diffusers.AutoencoderTiny}[Path(file).parent.name]

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran: the config was not refused before allocating")

    monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


# Each config would make diffusers/transformers allocate and initialise 4-34 GB before comparing it with the
# weights (measured: intermediate_size 2**22 alone peaked at 4.7 GB); the whole tiny model is 1.2 M numbers.
@pytest.mark.parametrize("file,change", [
    ("image_encoder/config.json", {"intermediate_size": 2**26}),
    ("image_encoder/config.json", {"hidden_size": 16384, "num_attention_heads": 16}),
    ("unet/config.json", {"time_embedding_dim": 2**16}),
    ("unet/config.json", {"block_out_channels": [16384, 16384], "norm_num_groups": 32}),
    ("vae/config.json", {"block_out_channels": [8192] * 4}),
])
def test_configs_describing_huge_models_are_refused_before_allocating(model, monkeypatch, file, change):
    _refuse_weight_loads(monkeypatch, file)
    _edit(model / file, **change)
    error, _ = _raises_within(lambda: _load(model), ModelError, match="but its weight files hold")
    assert str(model / file) in str(error)


@pytest.mark.parametrize("file,change,match", [
    ("vae/config.json", {"layers_per_block": 10**6}, "1..64"),
    ("unet/config.json", {"layers_per_block": [1, 10**6]}, "1..64"),
    ("unet/config.json", {"transformer_layers_per_block": [[1], [10**6]]}, "1..64"),
    ("image_encoder/config.json", {"num_hidden_layers": 10**5}, "1..256"),
])
def test_layer_counts_that_would_take_minutes_to_build_are_refused(model, monkeypatch, file, change, match):
    _refuse_weight_loads(monkeypatch, file)
    _edit(model / file, **change)
    _raises_within(lambda: _load(model), ModelError, match=match, seconds=10)


def test_a_tiny_vae_config_describing_a_huge_model(model, tmp_path, monkeypatch):
    from composekit.apps.random_models import make_random_tiny_vae

    taesd = make_random_tiny_vae(tmp_path / "taesd", "tiny", seed=3)
    _refuse_weight_loads(monkeypatch, "taesd/config.json")
    _edit(taesd / "config.json", num_decoder_blocks=[10**6, 1, 1, 1])
    _raises_within(lambda: _load(model, vae=taesd), ModelError, match="num_decoder_blocks")
    _edit(taesd / "config.json", num_decoder_blocks=[1, 1, 1, 1], decoder_block_out_channels=[8192] * 4)
    _raises_within(lambda: _load(model, vae=taesd), ModelError, match="but its weight files hold")


def test_deeply_nested_json(model):
    saved = (model / "unet" / "config.json").read_text()
    (model / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _raises_within(lambda: _load(model), ModelError, match="nests deeper")
    (model / "unet" / "config.json").write_text(saved)
    nested = {"a": 1}
    for _ in range(40):
        nested = {"a": nested}
    _edit(model / "vae" / "config.json", extra=nested)
    _raises_within(lambda: _load(model), ModelError, match="nests deeper than 32")


def test_special_files_are_refused_without_reading(model):
    (model / "scheduler" / "scheduler_config.json").unlink()
    os.symlink("/dev/zero", model / "scheduler" / "scheduler_config.json")
    _raises_within(lambda: _load(model), ModelError, match="(to /dev/zero); refusing to read it", seconds=10)
    index = model / "model_index.json"
    index.unlink()
    os.mkfifo(index)
    _raises_within(lambda: _load(model), ModelError, match="not a regular file", seconds=10)


def test_files_outside_the_directory_are_not_read(model, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(model / "unet" / "config.json", outside)
    (model / "unet" / "config.json").unlink()
    os.symlink(outside, model / "unet" / "config.json")
    _raises_within(lambda: _load(model), ModelError, match="leads outside")


def test_concurrent_loads_in_a_fresh_process(tiny_model_dir):
    # diffusers' lazy imports are not thread-safe; composekit serialises model loads.
    code = f"""
import threading
from composekit import Compositor
errors = []
def load():
    try:
        Compositor.from_pretrained({str(tiny_model_dir)!r}, device="cpu")
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ERRORS", errors)
assert not errors
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- exports and engines ----------------------------------------------------------------------------

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


# The runtimes of exports: every export check runs on each one installed.
EXPORT_BACKENDS = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir):
    from composekit_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("hostile-onnx") / "export"
    export_onnx(tiny_model_dir, out)
    return out


@pytest.fixture()
def export_copy(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    return copy


def _rehash(root: Path, component: str):
    from composekit.formats.export_manifest import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["components"][component]["sha256"] = sha256_file(root / manifest["components"][component]["file"])
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.pop("dims"), "dims"),
    (lambda m: m.update(precision=16), "precision"),
    (lambda m: m["dims"].update(model_size="64"), "model_size"),
    (lambda m: m["components"].update(unet="unet.onnx"), "unet"),
    (lambda m: m["components"]["unet"].pop("sha256"), "sha256"),
    (lambda m: m.update(source=None), "source"),
    (lambda m: m.update(scheduler=[]), "scheduler"),
    (lambda m: m["components"]["vae_decoder"].update(external_data=[{"file": 3}]), "external_data"),
])
def test_manifests_with_missing_or_mistyped_fields(export_copy, mutate, match):
    manifest = json.loads((export_copy / "manifest.json").read_text())
    mutate(manifest)
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    _raises_within(lambda: _load(export_copy), ModelError, match=match)


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
def test_a_swapped_graph_with_its_sha256_updated(export_copy, backend):
    shutil.copy(export_copy / "vae_decoder.onnx", export_copy / "unet.onnx")
    _rehash(export_copy, "unet")
    _raises_within(lambda: _load(export_copy, backend=backend), ModelError, match="not this export's graph")


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
@pytest.mark.parametrize("change,match", [(dict(precision="fp16"), "precision"),
                                          (dict(dims_context_tokens=5), "disagree")])
def test_manifest_that_contradicts_its_graphs(export_copy, change, match, backend):
    manifest = json.loads((export_copy / "manifest.json").read_text())
    if "precision" in change:
        manifest["precision"] = change["precision"]
    else:
        manifest["dims"]["context_tokens"] = change["dims_context_tokens"]
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    _raises_within(lambda: _load(export_copy, backend=backend), ModelError, match=match)


def test_sparse_initializer_external_data_outside_the_export(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from composekit.backends.graph import check_external_data

    values = helper.make_tensor("w_values", TensorProto.FLOAT, [1], [1.0])
    values.data_location = TensorProto.EXTERNAL
    values.ClearField("float_data")
    values.external_data.add(key="location", value="../../../etc/passwd")
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    graph.sparse_initializer.append(sparse)
    sparse.values.name = "w"
    graph.sparse_initializer[0].values.name = "w"
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with pytest.raises(ModelError, match="outside the export"):
        check_external_data(path, tmp_path)


@pytest.fixture()
def engine_copy(export_dir, tmp_path):
    from fake_tensorrt import build_fake_engines

    out = tmp_path / "engines"
    build_fake_engines(export_dir, out)
    return out


@pytest.fixture()
def fake_env(monkeypatch):
    import fake_tensorrt

    from composekit.backends import tensorrt_backend
    from composekit.backends.arrays import ArrayModule

    monkeypatch.setattr(tensorrt_backend, "_runtime_environment",
                        lambda device: (fake_tensorrt, ArrayModule("cpu"), ("Fake GPU", "9.0")))


def test_engine_files_and_sidecars_symlinked_outside(engine_copy, fake_env, tmp_path):
    entry = json.loads((engine_copy / "engines.json").read_text())["engines"]["unet"]["file"]
    target = tmp_path / "outside.plan"
    shutil.move(engine_copy / entry, target)
    os.symlink(target, engine_copy / entry)
    _raises_within(lambda: _load(engine_copy, backend="tensorrt"), ModelError, match="leads outside")
    os.unlink(engine_copy / entry)
    shutil.move(target, engine_copy / entry)
    sidecar = engine_copy / f"{entry}.json"
    shutil.move(sidecar, tmp_path / "sidecar.json")
    os.symlink(tmp_path / "sidecar.json", sidecar)
    _raises_within(lambda: _load(engine_copy, backend="tensorrt"), ModelError, match="leads outside")


@pytest.mark.parametrize("engines,match", [({"unet": 5}, "engines"), ([], "engines"), ({"unet": {"file": 7}}, "engines")])
def test_engines_json_entries_of_the_wrong_type(engine_copy, fake_env, engines, match):
    data = json.loads((engine_copy / "engines.json").read_text())
    data["engines"] = engines
    (engine_copy / "engines.json").write_text(json.dumps(data))
    _raises_within(lambda: _load(engine_copy, backend="tensorrt"), ModelError, match=match)


# -- generated mutations ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from([0, 1, -1, 2, 3, 4, 8, 9, 64, 1000, 0.5, "", "9", "fp16", "fp32"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _mutate_json(path: Path, data, key_choice, value, action: str) -> None:
    """Replace, delete or retype one key of one JSON object (nested objects reachable by key_choice)."""
    obj = json.loads(path.read_text())
    holder = obj
    keys = sorted(holder)
    key = keys[key_choice % len(keys)] if keys else "x"
    nested = holder.get(key)
    if isinstance(nested, dict) and nested and data.draw(st.booleans(), label="descend"):
        holder = nested
        keys = sorted(holder)
        key = keys[key_choice % len(keys)]
    if action == "delete":
        holder.pop(key, None)
    else:
        holder[key] = value
    event(f"{path.name}:{action}")
    path.write_text(json.dumps(obj))


def _set_or_delete(holder: dict, key: int, value, action: str, label: str) -> None:
    """Set (to ``value``) or delete the ``key``-th key of ``holder``, in sorted order."""
    keys = sorted(holder)
    k = keys[key % len(keys)]
    if action == "delete":
        holder.pop(k)
    else:
        holder[k] = value
    event(f"{label}:{action}:{k}")


def _file_mutation(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 3])
    elif how == "garbage":
        path.write_bytes(b"\x00\xff garbage " * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()
    event(f"{path.name}:{how}")


def _message_kind(message: str) -> str:
    """The message with paths, numbers and quoted values removed: one label per kind of failure."""
    import re

    text = message.split(";")[0]  # the part before the fix names the failure
    text = re.sub(r"(/[^\s:;,()']+)+", "PATH", text)
    text = re.sub(r"\(([^()]*)\)", "", text)  # parenthesised details
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[.*\]|\{.*\}|\b(None|True|False)\b", "V", text)
    text = re.sub(r"-?\d[\d.,e+-]*", "N", text)
    text = re.sub(r"\bV\b.*\bexpected\b", "V ... expected", text)
    return " ".join(text.split()[:6])


def _expect_typed(fn) -> str:
    start = time.perf_counter()
    try:
        fn()
        outcome = "loaded"
    except ComposekitError as exc:
        outcome = type(exc).__name__
        event(f"kind:{outcome}:{_message_kind(str(exc))}")
    elapsed = time.perf_counter() - start
    assert elapsed < CASE_SECONDS, f"case took {elapsed:.1f} s"
    event(f"outcome:{outcome}")
    return outcome


MODEL_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "image_encoder/config.json",
               "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"]
WEIGHT_FILES = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "image_encoder/model.safetensors"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=False, database=None)


@settings(max_examples=250, **SETTINGS)
@given(file=st.sampled_from(MODEL_FILES + WEIGHT_FILES), key=st.integers(0, 200), value=JSON_VALUES,
       action=st.sampled_from(["set", "set", "set", "delete", "truncate", "garbage", "empty", "directory", "missing"]),
       data=st.data())
def test_generated_model_directory_mutations(tiny_model_dir, tmp_path_factory, file, key, value, action, data):
    root = tmp_path_factory.mktemp("mut") / "m"
    shutil.copytree(tiny_model_dir, root)
    path = root / file
    if action in ("set", "delete") and file.endswith(".json"):
        _mutate_json(path, data, key, value, action)
    else:
        _file_mutation(path, action if action not in ("set", "delete") else "truncate")
    try:
        outcome = _expect_typed(lambda: Compositor.from_pretrained(root, device="cpu"))
        if outcome == "loaded":  # a harmless change: the model must still composite, keeping the background
            comp = Compositor.from_pretrained(root, device="cpu")
            if comp.backend.info.model_size > 1024:  # a valid but large sample_size: minutes a paste (4096 px: ~17)
                event("loaded: large model_size, not pasted")
                return
            bg = gradient_background(40, 30)
            try:
                r = comp.paste(noise_object(), bg, (5, 5, 30, 25), **FAST)
            except ComposekitError:
                return
            np.testing.assert_array_equal(np.asarray(r.image)[~r.mask], np.asarray(bg)[~r.mask])
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


@settings(max_examples=150, **SETTINGS)
@given(key=st.integers(0, 200), value=JSON_VALUES,
       target=st.sampled_from(["manifest", "dims", "component", "graph", "openvino_ir"]),
       action=st.sampled_from(["set", "set", "delete", "truncate", "garbage", "empty", "missing"]), data=st.data(),
       backend=st.sampled_from(EXPORT_BACKENDS), kind=st.sampled_from(["float", "int8"]))
def test_generated_export_mutations(export_dir, request, tmp_path_factory, key, value, target, action, data,
                                    backend, kind):
    """Mutations of a float export and of an int8 one (its QDQ U-Net graphs, its OpenVINO IRs and its manifest's
    int8 entry; where NNCF is not installed, the float export only)."""
    if kind == "int8" and importlib.util.find_spec("nncf") is None:
        kind = "float"
    if target == "openvino_ir" and kind == "float":
        target = "graph"  # a float export has no IR
    root = tmp_path_factory.mktemp("emut") / "e"
    shutil.copytree(export_dir if kind == "float" else request.getfixturevalue("int8_export"), root)
    event(f"export:{kind}")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    count = len(manifest["components"])
    if target == "graph":
        name = sorted(manifest["components"])[key % count]
        _file_mutation(root / manifest["components"][name]["file"], action if action not in ("set", "delete")
                       else "garbage")
        if data.draw(st.booleans(), label="rehash") and (root / manifest["components"][name]["file"]).is_file():
            _rehash(root, name)
    elif target == "openvino_ir":
        name = ("unet", "unet_shallow")[key % 2]
        ir = manifest["components"][name]["openvino"]
        if action in ("set", "delete"):
            _set_or_delete(ir, key // 2, value, action, "openvino_ir")
            manifest_path.write_text(json.dumps(manifest))
        else:
            item = (ir, ir["external_data"][0])[key // 2 % 2]
            _file_mutation(root / item["file"], action)
            if data.draw(st.booleans(), label="rehash") and (root / item["file"]).is_file():
                from composekit.formats.export_manifest import sha256_file

                item["sha256"] = sha256_file(root / item["file"])
                manifest_path.write_text(json.dumps(manifest))
    elif action in ("set", "delete"):
        holder = manifest if target == "manifest" else manifest["dims"] if target == "dims" else \
            manifest["components"][sorted(manifest["components"])[key % count]]
        _set_or_delete(holder, key, value, action, target)
        manifest_path.write_text(json.dumps(manifest))
    else:
        _file_mutation(manifest_path, action)
    _expect_typed(lambda: Compositor.from_pretrained(root, backend=backend, device="cpu"))
    shutil.rmtree(root.parent, ignore_errors=True)


@settings(max_examples=100, **SETTINGS)
@given(key=st.integers(0, 200), value=JSON_VALUES, target=st.sampled_from(["engines", "sidecar", "engine"]),
       action=st.sampled_from(["set", "set", "delete", "truncate", "garbage", "empty", "missing"]))
def test_generated_engine_mutations(export_dir, tmp_path_factory, key, value, target, action, monkeypatch):
    import fake_tensorrt
    from fake_tensorrt import build_fake_engines

    from composekit.backends import tensorrt_backend
    from composekit.backends.arrays import ArrayModule

    monkeypatch.setattr(tensorrt_backend, "_runtime_environment",
                        lambda device: (fake_tensorrt, ArrayModule("cpu"), ("Fake GPU", "9.0")))
    root = tmp_path_factory.mktemp("tmut") / "t"
    build_fake_engines(export_dir, root)
    index = json.loads((root / "engines.json").read_text())
    engine = root / index["engines"][sorted(index["engines"])[key % 4]]["file"]
    path = {"engines": root / "engines.json", "sidecar": Path(f"{engine}.json"), "engine": engine}[target]
    if action in ("set", "delete") and target != "engine":
        obj = json.loads(path.read_text())
        _set_or_delete(obj, key, value, action, target)
        path.write_text(json.dumps(obj))
    else:
        _file_mutation(path, action if action not in ("set", "delete") else "garbage")
    _expect_typed(lambda: Compositor.from_pretrained(root, backend="tensorrt"))
    shutil.rmtree(root.parent, ignore_errors=True)


def test_without_accelerate_the_torch_backend_says_what_to_install(model, monkeypatch):
    import sys

    from composekit import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    _raises_within(lambda: _load(model), BackendUnavailableError, match="accelerate")
