"""The benchmark harness runs and writes its three outputs (figures themselves are not asserted:
speed goals live in the benchmark reports, never in unit tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_harness_writes_json_markdown_and_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--steps", "2", "3", "--repeats", "2", "--warmup", "0",
         "--batch", "2", "--onnx", "--variants", "default", "channels_last", "--check-fp32", "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["rows"]) == {"composekit-torch-float32", "composekit-torch-float32-channels_last",
                                    "composekit-onnxruntime-fp32", "diffusers-PaintByExamplePipeline"}
    # the fp32 reference is the default row's own configuration: no difference at all
    assert results["rows"]["composekit-torch-float32"]["diff_vs_fp32"]["max"] == 0
    assert results["rows"]["composekit-onnxruntime-fp32"]["diff_vs_fp32"]["max"] <= 2
    row = results["rows"]["composekit-torch-float32"]
    # unet_shallow: feature caching's shallow pass, timed where the model has one (every torch model here)
    assert set(row["stages"]) == {"encode_object", "encode_image", "unet_step", "decode", "unet_shallow"}
    assert set(row["ratio_vs_diffusers"]) == {"2", "3", "per_step"}
    assert all(row["stages"][s]["n"] == 2 for s in row["stages"])
    assert "speed-up vs diffusers" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_speed_benchmark_runs_every_row(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("nncf")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_speed", "--size", "tiny", "--repeats", "1",
                           "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = results["rows"]
    assert rows["default: from_pretrained(export)"]["backend"] == "openvino"  # auto on this CPU machine
    assert rows["composekit torch fp32"]["diff_vs_torch_fp32"] == {"steps": 4, "max": 0, "mean": 0.0}
    for name in ("onnxruntime fp32 (plain export)", "openvino f32"):
        assert rows[name]["diff_vs_torch_fp32"]["max"] <= 2, name  # fp32 runtimes agree with torch
        assert "decode_tiny" in rows[name]["stages"]
    from benchmarks.cpu_speed import ROWS

    assert set(rows) | set(results["skipped"]) == set(ROWS) | {"diffusers PaintByExamplePipeline fp32"}
    assert results["machine"]["cpu"]["class"] in ("AMX", "AVX-512-BF16", "AVX-512", "AVX2", "other")
    # Cached rows: step counts that are multiples of the interval, the same-runtime ratio, an image difference
    # against torch fp32 at the same step count.
    cached = rows["default, cache_interval=5"]
    assert cached["steps"] == [5, 10] and cached["same_runtime_as"] == "default: from_pretrained(export)"
    # The ratio is computed (figures are not asserted: on the tiny model a slope from two step counts is noise and
    # can come out negative, as it did once in CI)
    assert isinstance(cached["per_step_vs_same_runtime"], float) and cached["diff_vs_torch_fp32"]["steps"] == 10
    assert rows["default, cache_interval=3"]["diff_vs_torch_fp32"]["max"] > 0  # caching changes the image
    assert "int8 U-Net" in rows["int8 export, speed='fast'"]["describe"]
    assert rows["int8 export, speed='fast'"]["steps"] == [3, 6]
    assert "OpenVINO IR" in rows["int8 export: from_pretrained(int8 export)"]["describe"]
    qdq = rows["int8 export on onnxruntime (QDQ graph)"]
    assert qdq["backend"] == "onnxruntime" and "int8 U-Net" in qdq["describe"] and "OpenVINO IR" not in qdq["describe"]
    todo = rows["int8 + token downsampling 2 export, cache_interval=3"]
    assert todo["describe"].endswith("int8 U-Net (OpenVINO IR), token downsampling 2x") and todo["same_runtime_as"] == \
        "int8 + token downsampling 2 export"
    assert "token downsampling 2x" in rows["torch fp32, token_downsampling=2"]["describe"]
    assert rows["torch fp32, token_downsampling=2"]["diff_vs_torch_fp32"]["max"] > 0  # it changes the image
    for row in rows.values():
        e2e = row["end_to_end"]
        assert abs(e2e["at_50_s"] - (e2e["fixed_s"] + 50 * e2e["per_step_s"])) < 1e-9
    text = (tmp_path / "out" / "results.md").read_text()
    assert "at 50 steps = fixed + 50 x slope, extrapolated" in text and text.startswith("CPU: ")


ISA_CAP_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("value, expected", [("AVX2", "AVX2"), ("avx2_vnni", "AVX2"), ("AVX512_CORE", "AVX-512"),
                                             ("AVX512_CORE_VNNI", "AVX-512"), ("AVX512_CORE_BF16", "AVX-512-BF16"),
                                             ("AVX512_CORE_AMX", "AMX"), ("SSE41", "other"), ("ALL", None),
                                             ("", None), ("SOMETHING_NEW", None)])
def test_onednn_isa_caps_map_to_cpu_classes(value, expected):
    from benchmarks.harness import _class_of_onednn_isa

    assert _class_of_onednn_isa(value) == expected


def test_a_run_under_an_isa_cap_is_labelled_an_emulation(monkeypatch):
    from benchmarks.harness import CLASSES, ISA_CAPS, cpu_description, cpu_label

    for var in ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    real = cpu_description()
    assert "isa_cap" not in real and "hardware_class" not in real and cpu_label(real) == real["class"]
    for var, value in ISA_CAP_ENV.items():
        monkeypatch.setenv(var, value)
    capped = cpu_description()
    assert capped["isa_cap"] == ISA_CAP_ENV and capped["flags"] == real["flags"]  # the hardware's flags, unchanged
    if CLASSES.index(real["class"]) > CLASSES.index("AVX2"):  # this CPU has more than AVX2: an emulation
        assert capped["class"] == "AVX2" and capped["hardware_class"] == real["class"]
        assert cpu_label(capped) == (f"AVX2 (emulated on a CPU of class {real['class']}, capped by "
                                     "ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2)")
    else:  # a cap at or above what the CPU has changes nothing but is still recorded
        assert capped["class"] == real["class"] and "hardware_class" not in capped


def test_cpu_speed_under_an_avx2_cap_runs_openvino_in_f32(tmp_path):
    """The benchmark under ONEDNN_MAX_CPU_ISA=AVX2: its header says so, and the OpenVINO backend's default precision
    follows the cap (f32; on a CPU with BF16 OpenVINO still reports BF16 and a bf16 graph would fail to compile)."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    import os

    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_speed", "--size", "tiny", "--repeats", "1",
                           "--steps", "2", "3", "--rows", "default: from_pretrained(export)", "openvino f32",
                           "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **ISA_CAP_ENV})
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cpu, rows = results["machine"]["cpu"], results["rows"]
    assert cpu["class"] in ("AVX2", "other") and cpu["isa_cap"] == ISA_CAP_ENV
    assert rows["default: from_pretrained(export)"]["describe"].startswith("OpenVINO CPU, f32")
    # the same f32 kernels as the explicit f32 row: the same image
    assert rows["default: from_pretrained(export)"]["diff_vs_torch_fp32"] == rows["openvino f32"]["diff_vs_torch_fp32"]
    if "hardware_class" in cpu:
        assert f"emulated on a CPU of class {cpu['hardware_class']}" in (tmp_path / "out" / "results.md").read_text()


def test_soak_checks_every_answer_and_records_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("the soak reads the server's memory from /proc (Linux)")
    pytest.importorskip("fastapi")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--requests", "45", "--clients", "4",
                           "--out", str(tmp_path / "soak")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("composekit-soak-")], "the soak left its model"
    result = json.loads((tmp_path / "soak.json").read_text())
    # 45 requests = 3 rounds of the mix: 8 good composites and 7 bad requests, each answered as it must be.
    assert result["mismatches"] == 0 and result["healthy_after"]
    assert result["answers"] == {"200": 24, "400": 3, "404": 3, "405": 3, "406": 3, "413": 3, "415": 3, "422": 3}
    assert result["rss_mb"][0]["after"] == 0 and result["rss_mb"][-1]["after"] == 45
    assert "RSS start -> end" in (tmp_path / "soak.md").read_text()


def test_compute_ceiling_counts_the_unet_and_bounds_the_ratio(tiny_model_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import compute_ceiling

    out = tmp_path / "ceiling"
    assert compute_ceiling.main(["--model", str(tiny_model_dir), "--steps", "10", "--cache-interval", "3",
                                 "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    # The meta-device count equals the same counter on a real pass of the real weights (with attention in
    # torch's math kernel: the counter does not see inside the fused CPU kernel a real pass would pick).
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet")).eval()
    side = unet.config.sample_size
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(torch.randn(2, 9, side, side), torch.tensor([500, 500]), encoder_hidden_states=torch.randn(2, 1, 32))
    assert r["unet_gflop"]["full_diffusers"] == pytest.approx(counter.get_total_flops() / 1e9)
    assert 0 < r["unet_gflop"]["shallow"] < r["unet_gflop"]["full"] < r["unet_gflop"]["full_diffusers"]
    assert r["unet_gflop"]["shallow"] < r["unet_gflop"]["shallow_diffusers"]  # the shortcut is counted in both
    assert (r["full_passes"], r["shallow_passes"]) == (4, 6)  # steps 0, 3, 6, 9 are full passes
    assert set(r["peaks_gops"]) >= {"int8", "f32"} and all(p["ops_per_s"] > 0 for p in r["peaks_gops"].values())
    ceiling = (4 * r["unet_gflop"]["full"] + 6 * r["unet_gflop"]["shallow"]) / r["peaks_gops"]["int8"]["ops_per_s"]
    assert r["unet_ceiling_s"] == pytest.approx(ceiling)
    assert r["ceiling_ratio"] == pytest.approx(10 * r["diffusers_unet_step_s"] / ceiling)
    assert "at most" in out.with_suffix(".md").read_text()


def test_openvino_profile_splits_each_graph_of_an_int8_export(int8_export, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from benchmarks import profile_openvino

    out = tmp_path / "profile"
    assert profile_openvino.main(["--export", str(int8_export), "--repeats", "1", "--int8-float-graphs",
                                  "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    # The U-Net passes run from the int8 IR (as the OpenVINO backend runs them), at the guided batch
    assert rows["unet"]["file"] == "unet.int8.xml" and rows["unet"]["batch"] == 2
    assert rows["unet_shallow"]["file"] == "unet_shallow.int8.xml"
    assert rows["vae_decoder"]["file"] == "vae_decoder.onnx" and rows["vae_decoder"]["batch"] == 1
    for row in rows.values():
        assert row["median_s"] > 0 and abs(sum(row["share"].values()) - 1) < 1e-6
    assert rows["unet"]["share"]["attention core"] > 0  # the tiny U-Net has attention blocks: they are found
    assert rows["vae_decoder"]["share"]["attention core"] > 0  # and so has the VAE decoder's mid block
    assert rows["object_encoder"]["share"]["attention core"] > 0  # and CLIP's layers
    quantized = rows["vae_decoder, int8 (NNCF, random calibration)"]
    assert quantized["speedup_vs_float"] > 0 and "quantized here" in quantized["file"]
    assert "| unet | unet.int8.xml | 2 |" in out.with_suffix(".md").read_text()
    for row in rows.values():  # attention's core split by kernel adds up to its share of the counted time
        split = sum(row["attention_core_s_by_kernel"].values())
        assert split == pytest.approx(row["share"]["attention core"] * row["counted_s"], rel=1e-6, abs=1e-9)
    only = tmp_path / "only"
    assert profile_openvino.main(["--export", str(int8_export), "--repeats", "1", "--graphs", "unet_shallow",
                                  "--out", str(only)]) == 0
    assert list(json.loads(only.with_suffix(".json").read_text())["rows"]) == ["unet_shallow"]


def test_single_token_benchmark_compares_torch_and_two_exports(tiny_model_dir, exported, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from composekit_export.onnx_export import export_onnx

    from benchmarks import single_token_attention
    from composekit.backends import torch_backend

    before = tmp_path / "before"
    with monkeypatch.context() as m:  # an export traced as composekit did before the shortcut: full cross-attention
        m.setattr(torch_backend, "apply_single_token_attention", lambda unet: 0)
        export_onnx(tiny_model_dir, before)
    after = exported["paint_by_example"][1]
    out = tmp_path / "single"
    assert single_token_attention.main(["--model", str(tiny_model_dir), "--exports", str(before), str(after),
                                        "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    t = result["torch"]
    assert t["cross_attentions"] > 0 and t["rel_diff"] < 1e-5 and t["speedup"] > 0
    assert len(t["times_s"]["single-token shortcut"]) == 2
    ov = result["openvino"]
    assert {k: v["single_token_cross_attention"] for k, v in ov["exports"].items()} == {"before": False, "after": True}
    for name in ("unet", "unet_shallow"):  # the two graphs compute the same function
        assert ov[name]["rel_diff"] < (5e-2 if ov["precision"] == "bf16" else 1e-4), name  # bf16: rounding
        assert ov[name]["speedup"] == pytest.approx(ov[name]["median_s"]["before"] / ov[name]["median_s"]["after"])
    text = out.with_suffix(".md").read_text()
    assert "| torch float32 | U-Net" in text and "| OpenVINO" in text


def test_cutoff_runs_an_export_and_records_the_machine(exported, tmp_path):
    pytest.importorskip("openvino")
    from benchmarks import cutoff

    _, dst = exported["paint_by_example"]
    out = tmp_path / "cutoff.json"
    assert cutoff.main(["--model", str(dst), "--reference", "2", "--configs", "1:1.0", "2:1.0:region",
                        "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"].startswith("OpenVINO CPU") and result["machine"]["class"]
    assert result["command"] == f"python -m benchmarks.cutoff --model {dst} --reference 2 --configs 1:1.0 " \
        f"2:1.0:region --json {out}"
    rows = {(r["steps"], r["decode"]): r for r in result["rows"]}
    assert rows[(2, "window")]["max_diff"] == 0 and rows[(2, "window")]["unet_passes"] == 4
    assert rows[(1, "window")]["unet_passes"] == 2 and rows[(2, "region")]["decode_seconds"] > 0
