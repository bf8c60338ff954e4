"""TensorRT: what can be checked without TensorRT (profiles, sidecars, staleness) runs everywhere;
building engines needs TensorRT and a GPU and skips with that reason where they are absent."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from composekit import EngineIncompatibleError, ModelError
from composekit.core.specs import ModelDims, component_specs
from composekit.formats.engine_dir import (
    EngineSidecar,
    check_engine,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from composekit.formats.export_manifest import sha256_file

SD = ModelDims(model_size=512, vae_scale_factor=8, latent_channels=4, unet_in_channels=9, context_tokens=1,
               context_dim=768)


def test_profiles_follow_the_specs():
    specs = component_specs(SD)
    unet = specs["unet"].trt_profile()
    assert unet["sample"] == ((1, 9, 64, 64), (2, 9, 64, 64), (4, 9, 64, 64))  # CFG batch 2 is the optimum
    assert unet["timestep"] == ((1,), (2,), (4,))
    assert unet["encoder_hidden_states"] == ((1, 1, 768), (2, 1, 768), (4, 1, 768))
    assert specs["vae_decoder"].trt_profile()["latent"][1] == (1, 4, 64, 64)
    assert specs["object_encoder"].trt_profile()["pixel_values"][0] == (1, 3, 224, 224)
    dyn = component_specs(SD, dynamic_spatial=True)
    assert dyn["unet"].trt_profile()["sample"] == ((1, 9, 32, 32), (2, 9, 64, 64), (4, 9, 128, 128))
    assert dyn["vae_decoder"].dynamic_axes()["image"] == {0: "B", 2: "H", 3: "W"}


def _engine(tmp_path, **overrides):
    engine = tmp_path / "unet.plan"
    engine.write_bytes(b"not really an engine, but bytes with a hash")
    fields = dict(component="unet", engine_file=engine.name, engine_sha256=sha256_file(engine),
                  source_onnx="unet.onnx", source_onnx_sha256="0" * 64, tensorrt_version="10.3.0",
                  gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", build_flags={"fp16": True})
    fields.update(overrides)
    write_sidecar(engine, EngineSidecar(**fields))
    return engine


HERE = dict(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_sidecar_round_trip_and_engine_untouched(tmp_path):
    engine = _engine(tmp_path)
    before = engine.read_bytes()
    sidecar = check_engine(engine, **HERE)
    assert sidecar.component == "unet" and sidecar.created and read_sidecar(engine) == sidecar
    assert engine.read_bytes() == before and sidecar_path(engine).name == "unet.plan.json"


def test_modified_engine_is_refused(tmp_path):
    engine = _engine(tmp_path)
    engine.write_bytes(engine.read_bytes() + b"!")
    with pytest.raises(ModelError, match="sha256"):
        check_engine(engine, **HERE)


@pytest.mark.parametrize("field,value,match", [("tensorrt_version", "10.0.1", "TensorRT version"),
                                               ("compute_capability", "8.0", "architecture")])
def test_stale_engines_say_how_to_rebuild(tmp_path, field, value, match):
    engine = _engine(tmp_path)
    here = dict(HERE, **{field: value})
    with pytest.raises(EngineIncompatibleError, match=match) as info:
        check_engine(engine, **here)
    assert "composekit-export tensorrt" in str(info.value)


def test_compatibility_flags_and_other_gpu_of_same_arch(tmp_path, caplog):
    engine = _engine(tmp_path, build_flags={"fp16": True, "version_compatible": True})
    check_engine(engine, **dict(HERE, tensorrt_version="10.5.0"))
    caplog.set_level(logging.WARNING, logger="composekit")
    check_engine(engine, **dict(HERE, gpu_name="NVIDIA H200"))
    assert any("tuned" in r.getMessage() for r in caplog.records)


def test_missing_or_foreign_sidecar(tmp_path):
    engine = tmp_path / "x.plan"
    engine.write_bytes(b"x")
    with pytest.raises(ModelError, match="no sidecar"):
        check_engine(engine, **HERE)
    sidecar_path(engine).write_text('{"format": "something else"}')
    with pytest.raises(ModelError, match="not a composekit engine sidecar"):
        check_engine(engine, **HERE)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "composekit_export", "tensorrt", tmp_path, tmp_path / "engines"],
                          capture_output=True, text=True)
    assert proc.returncode == 4 and "needs TensorRT" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installed: no machine this project is built and tested on has it")
def test_build_engines_from_a_tiny_export(tmp_path, tiny_model_dir):  # pragma: no cover - needs TensorRT + GPU
    import numpy as np
    from composekit_export.onnx_export import export_onnx
    from composekit_export.tensorrt_build import build_engines
    from conftest import gradient_background, noise_object

    from composekit import Compositor
    from composekit.formats.engine_dir import gpu_identity

    export_onnx(tiny_model_dir, tmp_path / "onnx")
    engines = build_engines(tmp_path / "onnx", tmp_path / "engines", timing_cache=tmp_path / "cache")
    import tensorrt

    name, cc = gpu_identity()
    for entry in engines.values():
        check_engine(tmp_path / "engines" / entry["file"], tensorrt_version=tensorrt.__version__, gpu_name=name,
                     compute_capability=cc)
    assert (tmp_path / "cache").stat().st_size > 0
    # The real engines against the PyTorch backend (fp16 engines: the tolerance is fp16's).
    bg, obj, box = gradient_background(140, 100), noise_object(), (20, 10, 100, 80)
    ref = Compositor.from_pretrained(tiny_model_dir, device="cpu").paste(obj, bg, box, steps=5, seed=3, progress=False)
    for graph in (False, True):
        comp = Compositor.from_pretrained(tmp_path / "engines", backend="tensorrt", cuda_graph=graph)
        got = comp.paste(obj, bg, box, steps=5, seed=3, progress=False)
        np.testing.assert_array_equal(np.asarray(got.image)[~got.mask], np.asarray(bg)[~got.mask])
        assert np.abs(np.asarray(got.image, int) - np.asarray(ref.image, int)).max() <= 8


def test_networks_are_strongly_typed_on_tensorrt_10_and_11():
    from types import SimpleNamespace

    from composekit_export.tensorrt_build import _network_flags

    flags = SimpleNamespace(STRONGLY_TYPED=5)
    assert _network_flags(SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=flags)) == 1 << 5
    # TensorRT 11 builds only strongly typed networks (its weak-typing flags are gone): no flag to pass
    assert _network_flags(SimpleNamespace(__version__="11.4.0.106", NetworkDefinitionCreationFlag=flags)) == 0
