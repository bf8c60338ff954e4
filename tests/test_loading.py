"""Model sources and layouts: every failure is a typed error naming the path and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from composekit import BackendUnavailableError, Compositor, InputError, ModelError, ModelNotFoundError
from composekit.errors import UnsafeModelFileError
from composekit.formats.model_source import HUB_ALLOW_PATTERNS, read_model_dir


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_layout_is_read(tiny_model_dir):
    files = read_model_dir(tiny_model_dir)
    assert files.family == "paint_by_example"
    assert files.configs["unet"]["in_channels"] == 9
    assert all(p.suffix == ".safetensors" for ps in files.weights.values() for p in ps)


@pytest.mark.parametrize("component", ["unet", "vae", "image_encoder", "scheduler", "feature_extractor"])
def test_missing_component(model_copy, component):
    shutil.rmtree(model_copy / component)
    with pytest.raises(ModelError, match=component):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_missing_model_index(model_copy):
    (model_copy / "model_index.json").unlink()
    with pytest.raises(ModelError, match="model_index.json"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_pickle_only_weights_are_refused(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(model_copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeModelFileError, match="safetensors"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_no_weights_at_all(model_copy):
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="vae"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_corrupt_config(model_copy):
    (model_copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_wrong_unet_channels(model_copy):
    cfg_path = model_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 7
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="in_channels=7"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_mismatched_components(model_copy):
    cfg_path = model_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="cross_attention_dim"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_weights_that_do_not_fit_the_config(model_copy):
    cfg_path = model_copy / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [16, 16, 16, 16]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="vae"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_unknown_pipeline(model_copy):
    (model_copy / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionPipeline"):
        Compositor.from_pretrained(model_copy, device="cpu")


def test_not_a_directory_or_repo(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither"):
        Compositor.from_pretrained(tmp_path / "nope" / "deeper" / "x")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="file"):
        Compositor.from_pretrained(f)


def test_hub_repo_offline_gives_clear_error(tmp_path, monkeypatch):
    # No network here: HF_HUB_OFFLINE and local_files_only must fail fast with a typed error.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="cache"):
        Compositor.from_pretrained("composekit-tests/does-not-exist", local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        Compositor.from_pretrained("composekit-tests/does-not-exist")


def test_hub_snapshot_in_cache_loads_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A repo already in the Hugging Face cache loads with no network, through snapshot_download."""
    cache = tmp_path / "hub"
    commit = "0" * 40
    snap = cache / "models--composekit-tests--tiny" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snap)
    refs = cache / "models--composekit-tests--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    # huggingface_hub < 0.25 binds the cache path into the downloader module at import time.
    monkeypatch.setattr("huggingface_hub._snapshot_download.HF_HUB_CACHE", str(cache), raising=False)
    comp = Compositor.from_pretrained("composekit-tests/tiny", local_files_only=True, device="cpu")
    assert comp.backend.info.source == str(snap)


def test_allow_patterns_fetch_only_what_is_used():
    assert "model_index.json" in HUB_ALLOW_PATTERNS
    assert "unet/*.safetensors" in HUB_ALLOW_PATTERNS
    assert not any(p.startswith("safety_checker") for p in HUB_ALLOW_PATTERNS)
    assert not any(p.endswith(".bin") for p in HUB_ALLOW_PATTERNS)


def test_gpu_request_without_gpu_raises(tiny_model_dir):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the no-GPU error cannot be provoked")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        Compositor.from_pretrained(tiny_model_dir, device="cuda")


def test_bad_backend_and_dtype(tiny_model_dir):
    with pytest.raises(InputError, match="backend"):
        Compositor.from_pretrained(tiny_model_dir, backend="tensorflow")
    with pytest.raises(InputError, match="dtype"):
        Compositor.from_pretrained(tiny_model_dir, device="cpu", dtype="int8")


def test_auto_backend_logs_its_choice(tiny_model_dir, caplog):
    caplog.set_level("INFO", logger="composekit")
    comp = Compositor.from_pretrained(tiny_model_dir, backend="auto", device="cpu")
    assert comp.backend.name == "torch"
    assert any("auto" in r.getMessage() and "torch" in r.getMessage() for r in caplog.records)


def test_import_does_not_pull_torch():
    code = "import sys, composekit; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_models_are_deterministic(tmp_path):
    from composekit.apps.random_models import make_random_model

    a = make_random_model(tmp_path / "a", "tiny", seed=3)
    b = make_random_model(tmp_path / "b", "tiny", seed=3)
    c = make_random_model(tmp_path / "c", "tiny", seed=4)
    name = "unet/diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file

    wa, wb, wc = (load_file(str(d / name)) for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)
    with pytest.raises(InputError, match="exists"):
        make_random_model(a, "tiny")
    with pytest.raises(InputError, match="size"):
        make_random_model(tmp_path / "d", "huge")


@pytest.mark.parametrize("component,file", [("vae", "diffusion_pytorch_model.safetensors"),
                                            ("image_encoder", "model.safetensors")])
@pytest.mark.parametrize("case,match", [("missing", "missing"), ("shape", "shape|size mismatch"),
                                        ("nan", "NaN"), ("dtype", "dtype I32")])
def test_corrupt_weights_are_refused_naming_the_tensor(model_copy, component, file, case, match):
    import hashlib

    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = model_copy / component / file
    state = load_file(str(path))
    key = "decoder.conv_in.weight" if component == "vae" else next(k for k in state if "post_layernorm.weight" in k)
    if case == "missing":
        del state[key]
    elif case == "shape":
        state[key] = np.zeros((3, 3), np.float32)
    elif case == "nan":
        state[key] = state[key].copy()
        state[key].flat[0] = np.nan
    else:
        state[key] = state[key].astype(np.int32)
    save_file(state, str(path), metadata={"format": "pt"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelError, match=match) as info:
        Compositor.from_pretrained(model_copy, device="cpu")
    assert key.split(".")[-2] in str(info.value)  # the message names the tensor
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the caller's file is untouched


def test_hub_repo_with_only_pickle_weights_is_explained(tiny_model_dir, tmp_path, monkeypatch):
    """A Hub snapshot whose U-Net folder lacks safetensors: the repo listing shows pickle files, and the
    error says so (no network: snapshot_download and the listing are stand-ins)."""
    import huggingface_hub

    snap = tmp_path / "snap"
    shutil.copytree(tiny_model_dir, snap)
    (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snap))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, revision=None: ["unet/config.json", "unet/diffusion_pytorch_model.bin"])
    with pytest.raises(UnsafeModelFileError, match=r"only pickle weights for \['unet'\]"):
        Compositor.from_pretrained("someone/pickle-only", device="cpu")


def test_clip_weights_in_the_transformers_5_layout(model_copy):
    """Under transformers 5 the newer layout loads; under 4.x the error says to upgrade (the floors job runs 4.44)."""
    import transformers
    from safetensors.numpy import load_file, save_file

    path = model_copy / "image_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k.replace("model.vision_model.", "model.", 1): v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    if int(transformers.__version__.split(".")[0]) >= 5:
        Compositor.from_pretrained(model_copy, device="cpu")
    else:
        with pytest.raises(ModelError, match=r"transformers 5 .*pip install 'transformers>=5'"):
            Compositor.from_pretrained(model_copy, device="cpu")
