"""The real `composekit` entry point, run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from PIL import Image


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "composekit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def test_version_does_not_import_torch():
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; from composekit.apps.cli import main\ntry:\n main(['--version'])\nexcept SystemExit: pass\n"
         "assert 'torch' not in sys.modules, 'torch imported'"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.startswith("composekit ")


def test_help_lists_commands():
    out = run("--help").stdout
    for cmd in ("paste", "make-model", "env"):
        assert cmd in out


def test_paste_end_to_end(tiny_model_dir, tmp_path):
    bg = gradient_background(120, 90)
    bg.save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "obj.png")
    out = tmp_path / "out" / "result.png"
    proc = run("paste", tmp_path / "obj.png", tmp_path / "bg.png", "--box", "10,20,70,80", "-o", out,
               "--model", tiny_model_dir, "--steps", "2", "--seed", "3", "--device", "cpu", "--json", "-q",
               "--guidance-end", "0.5", "--decode", "region")
    info = json.loads(proc.stdout)
    assert info["seed"] == 3 and info["box"] == [10, 20, 70, 80]
    result = np.asarray(Image.open(out))
    outside = np.ones((90, 120), bool)
    outside[20:80, 10:70] = False
    np.testing.assert_array_equal(result[outside], np.asarray(bg)[outside])
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp file left


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["--box", "1,2,3"], 2, "four integers"),
        (["--box", "0,0,500,500"], 2, "outside"),
        ([], 2, "--box or --mask"),
    ],
)
def test_bad_arguments(tiny_model_dir, tmp_path, args, code, text):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "obj.png")
    proc = run("paste", tmp_path / "obj.png", tmp_path / "bg.png", "-o", tmp_path / "o.png", "--model",
               tiny_model_dir, "--device", "cpu", *args, check=False)
    assert proc.returncode == code
    assert text in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_missing_model_exit_code(tmp_path):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    proc = run("paste", tmp_path / "bg.png", tmp_path / "bg.png", "--box", "0,0,8,8", "-o", tmp_path / "o.png",
               "--model", tmp_path / "missing" / "model" / "x", check=False)
    assert proc.returncode == 3 and "model error" in proc.stderr


def test_make_model_and_env(tmp_path):
    proc = run("make-model", "tiny", tmp_path / "m", "--seed", "1")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert "tiny" in proc.stdout
    proc = run("make-model", "tiny", tmp_path / "m", check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    run("make-model", "tiny", tmp_path / "os", "--family", "objectstitch", "--adaptor", "conv1d", "--unet-channels", "4")
    index = json.loads((tmp_path / "os" / "model_index.json").read_text())
    assert index["_class_name"] == "ObjectStitchPipeline" and index["adaptor_kind"] == "conv1d"
    assert json.loads((tmp_path / "os" / "unet" / "config.json").read_text())["in_channels"] == 4
    env = json.loads(run("env", "--json").stdout)
    assert env["composekit"] and env["numpy"] and "cuda_devices" in env


def test_batch_over_a_folder_and_a_boxes_file(tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    for i, size in enumerate([(120, 90), (200, 150)]):
        gradient_background(*size).save(shots / f"bg{i}.png")
    noise_object().save(tmp_path / "obj.png")
    boxes = {"bg0.png": [10, 10, 60, 60], "bg1.png": [[0, 0, 50, 50], [100, 50, 190, 140]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    proc = run("batch", tmp_path / "obj.png", shots, "--boxes", tmp_path / "boxes.json", "-o", tmp_path / "out",
               "--json")
    records = json.loads(proc.stdout)
    assert [r["box"] for r in records] == [[10, 10, 60, 60], [0, 0, 50, 50], [100, 50, 190, 140]]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["bg0.png", "bg1-0.png", "bg1-1.png", "manifest.jsonl"]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert manifest == records  # the report --json prints is the manifest the run left
    bg = np.asarray(Image.open(shots / "bg1.png"))
    out = np.asarray(Image.open(tmp_path / "out" / "bg1-1.png"))
    outside = np.ones(bg.shape[:2], bool)
    outside[50:140, 100:190] = False
    np.testing.assert_array_equal(out[outside], bg[outside])
    proc = run("batch", tmp_path / "obj.png", shots, "-o", tmp_path / "out2", check=False)
    assert proc.returncode == 2 and "exactly one of --box" in proc.stderr


def test_missing_torch_is_a_clear_error(tmp_path):
    """Without the torch extra, commands that need it exit 4 with the install command (no traceback)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from composekit.apps.cli import main\n"
            f"sys.exit(main(['make-model', 'tiny', {str(tmp_path / 'm')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    assert ".[torch]" in proc.stderr and "torch==2.13.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_paste_several_objects_fidelity_and_silhouette(tiny_model_dir, tmp_path):
    bg = gradient_background(160, 100)
    bg.save(tmp_path / "bg.png")
    noise_object(seed=1).save(tmp_path / "a.png")
    noise_object(seed=2).save(tmp_path / "b.png")
    out = tmp_path / "two.png"
    proc = run("paste", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "bg.png", "--box", "10,10,60,70",
               "--box", "90,20,150,90", "-o", out, "--model", tiny_model_dir, "--steps", "2", "--seed", "5",
               "--fidelity", "0.5", "--device", "cpu", "--json", "-q")
    info = json.loads(proc.stdout)
    assert info["boxes"] == [[10, 10, 60, 70], [90, 20, 150, 90]] and info["seeds"][0] == 5
    from composekit import Compositor

    direct = Compositor.from_pretrained(tiny_model_dir, device="cpu").paste(
        [tmp_path / "a.png", tmp_path / "b.png"], bg, [(10, 10, 60, 70), (90, 20, 150, 90)], steps=2, seed=5,
        fidelity=0.5, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(direct.image))
    proc = run("paste", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "bg.png", "--box", "10,10,60,70", "-o",
               out, check=False)
    assert proc.returncode == 2 and "2 --box" in proc.stderr
    cut = np.dstack([np.asarray(noise_object(40, 40)), np.pad(np.full((20, 20), 255, np.uint8), 10)])
    Image.fromarray(cut, "RGBA").save(tmp_path / "cut.png")
    proc = run("paste", tmp_path / "cut.png", tmp_path / "bg.png", "--box", "20,10,100,90", "-o", out,
               "--region", "silhouette", "--margin", "2", "--json", "--shadow", "0")
    assert json.loads(proc.stdout)["method"] == "classic" and "seed" not in json.loads(proc.stdout)
    changed = (np.asarray(Image.open(out)) != np.asarray(bg)).any(axis=2)
    assert changed.any() and not changed[10:28, 20:38].any()  # the corner outside the grown silhouette


@pytest.mark.parametrize("flags,text", [(["--steps", "3"], "--steps applies to the generative"),
                                        (["--fidelity", "0.5"], "--fidelity applies"),
                                        (["--device", "cuda"], "--device applies")])
def test_classic_refuses_generative_flags(tmp_path, flags, text):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    proc = run("paste", tmp_path / "bg.png", tmp_path / "bg.png", "--box", "0,0,8,8", "-o", tmp_path / "o.png",
               *flags, check=False)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr


def test_batch_keeps_going_past_a_bad_file_and_resumes(tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    gradient_background(120, 90).save(shots / "a.png")
    (shots / "b.png").write_bytes(b"not an image")
    gradient_background(120, 90).save(shots / "c.png")
    noise_object().save(tmp_path / "obj.png")
    proc = run("batch", tmp_path / "obj.png", shots, "--box", "10,10,60,60", "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "1 FAILED" in proc.stdout and "b.png" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png", "manifest.jsonl"]
    stamp = (tmp_path / "out" / "a.png").stat().st_mtime_ns
    proc = run("batch", tmp_path / "obj.png", shots / "a.png", shots / "c.png", "--box", "10,10,60,60", "-o",
               tmp_path / "out", "--json")
    assert [r["status"].split()[0] for r in json.loads(proc.stdout)] == ["skipped", "skipped"]
    assert (tmp_path / "out" / "a.png").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("argv,text", [
    (["paste", "{obj}", "{bg}", "--box", "0,0,8,8", "-o", "/proc/x.png"], "/proc/x.png"),
    (["paste", "{obj}", "{bg}", "--box", "0,0,8,8", "-o", "{obj}/out.png"], "out.png"),
    (["paste", "{obj}", "{bg}", "--box", "0,0,8,8", "-o", "{tmp}"], "folder"),
    (["paste", "{obj}", "{bg}", "--box", "0,0,8,8", "-o", "{tmp}/x.gif2"], "unknown extension"),
    (["paste", "{tmp}", "{bg}", "--box", "0,0,8,8", "-o", "{tmp}/o.png"], "is a folder"),
    (["paste", "{obj}", "{bg}", "--box", "-10,0,50,50", "-o", "{tmp}/o.png"], "outside"),
    (["demo", "/proc/nope"], "/proc/nope"),
    (["demo", "{obj}"], "it is a file"),
    (["make-model", "tiny", "{obj}/x"], "cannot create"),
    (["make-model", "tiny", "/proc/m"], "/proc/m"),
    (["batch", "{obj}", "{bg}", "--box", "0,0,8,8", "-o", "/proc/out"], "/proc/out"),
    (["batch", "{obj}", "{tmp}/nothing-here", "--box", "0,0,8,8", "-o", "{tmp}/out"], "neither"),
    (["serve", "--port", "-5"], "port"),
])
def test_odd_and_unwritable_paths_never_print_a_traceback(tmp_path, argv, text):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    noise_object().save(tmp_path / "obj.png")
    args = [a.format(obj=tmp_path / "obj.png", bg=tmp_path / "bg.png", tmp=tmp_path) for a in argv]
    proc = run(*args, check=False)
    assert proc.returncode in (2, 4), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and text in proc.stderr, proc.stderr


def test_library_words_become_flags_and_v_after_the_command(tmp_path):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    proc = run("paste", tmp_path / "bg.png", tmp_path / "bg.png", "--box", "0,0,8,8", "-o", tmp_path / "o.png",
               "-v", "--model", tmp_path / "none", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    run("make-model", "tiny", tmp_path / "m")
    proc = run("make-model", "tiny", tmp_path / "m", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "overwrite=True" not in proc.stderr
    assert "torchvision" not in proc.stderr


def test_threads_flag_sets_the_torch_pool(tiny_model_dir, tmp_path):
    gradient_background(64, 64).save(tmp_path / "bg.png")
    code = ("import sys, torch\nfrom composekit.apps.cli import main\n"
            f"rc = main(['paste', {str(tmp_path / 'bg.png')!r}, {str(tmp_path / 'bg.png')!r}, '--box', '0,0,8,8', "
            f"'-o', {str(tmp_path / 'o.png')!r}, '--model', {str(tiny_model_dir)!r}, '--steps', '1', '--threads', '1', "
            "'-q'])\nprint(rc, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["0", "1"], out.stderr
