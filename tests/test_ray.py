"""`composekit batch --ray` on a local Ray cluster (127.0.0.1 only), against the same batch without Ray.

Ray is kept on loopback: node address 127.0.0.1, usage stats off, every proxy variable pointed at a
closed loopback port, set in the environment of the process that starts Ray (its workers inherit it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import gradient_background, noise_object
from PIL import Image

pytest.importorskip("ray")

LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                                     "https_proxy", "all_proxy")}}


def cli(*args):
    env = {**os.environ, **LOOPBACK_ENV}
    if "--address" in args:
        env["RAY_AUTH_MODE"] = "token"  # `ray start` clusters use token auth; the client reads ~/.ray/auth_token
    return subprocess.run([sys.executable, "-m", "composekit", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module (head on 127.0.0.1, 2 CPUs, 200 MB object store)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **LOOPBACK_ENV}
    start = subprocess.run(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2), "--include-dashboard",
                            "false", "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-shots")
    for i, size in enumerate([(120, 90), (90, 70), (150, 100), (100, 100)]):
        gradient_background(*size).save(root / f"bg{i}.png")
    (root / "bg2.png").write_bytes(b"not an image")  # a bad file in the middle
    noise_object().save(root / "obj.png")
    return root


def _check(shots, tmp_path, extra, ray_flags):
    backgrounds = [shots / f"bg{i}.png" for i in range(4)]
    common = ["batch", shots / "obj.png", *backgrounds, "--box", "10,10,60,60", "--batch-size", 2, *extra]
    plain = cli(*common, "-o", tmp_path / "plain")
    assert plain.returncode == 2 and "1 FAILED" in plain.stdout, plain.stderr
    ray_run = cli(*common, "-o", tmp_path / "ray", "--ray", *ray_flags)
    assert ray_run.returncode == 2 and "1 FAILED" in ray_run.stdout, ray_run.stdout + ray_run.stderr
    assert "Traceback" not in ray_run.stderr
    records = [json.loads(line) for line in (tmp_path / "ray" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok", "failed", "ok"]
    assert "not a readable image" in records[2]["error"]
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.png")) == ["bg0.png", "bg1.png", "bg3.png"]
    for name in ("bg0.png", "bg1.png", "bg3.png"):  # the same pixels as without Ray
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ray" / name)),
                                      np.asarray(Image.open(tmp_path / "plain" / name)))
    # A re-run skips the finished rows and retries the failed one.
    again = cli(*common, "-o", tmp_path / "ray", "--ray", *ray_flags)
    records = [json.loads(line) for line in (tmp_path / "ray" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["failed", "skipped", "skipped", "skipped"], records
    assert again.returncode == 2
    return records


def test_classic_batch_on_a_local_ray_started_by_the_command(shots, tmp_path):
    # Runs before the module's cluster exists: without --address the command starts its own, on 127.0.0.1.
    _check(shots, tmp_path, [], ["--workers", 2])


def test_generative_batch_on_a_cluster_by_address(shots, tmp_path, tiny_model_dir, cluster):
    records = _check(shots, tmp_path, ["--model", tiny_model_dir, "--steps", 2, "--device", "cpu"],
                     ["--address", cluster, "--workers", 2])
    # A skipped row keeps the seed and timings of the run that wrote it (from that run's manifest).
    assert all(r["seed"] == 0 and r["timings"] for r in records if r["status"] == "skipped")


# -- composekit serve --ray: the same app as a Ray Serve deployment on the module's cluster -----------------------


def _ray_serving(cluster, *args):
    pytest.importorskip("ray.serve")
    from test_serve import serving

    return serving("--ray", "--address", cluster, *args, env={**LOOPBACK_ENV, "RAY_AUTH_MODE": "token"})


def test_serve_on_ray_answers_like_composekit_serve(tiny_model_dir, cluster):
    from test_serve import BG, MALFORMED, OBJ, _array, call, paste, serving

    requests = [dict(seed=s) for s in range(4)] + [dict(seed="", method="classic", steps=""),
                                                    dict(seed=6, fidelity=0.5)]
    answers = {}
    # One thread on both sides: Ray gives a replica OMP_NUM_THREADS = its CPUs (1), and float sums in
    # another thread count round differently.
    serve_args = ("--model", tiny_model_dir, "--device", "cpu", "--max-upload-mb", 1, "--threads", 1)
    for name, server in (("local", serving), ("ray", lambda *a: _ray_serving(cluster, *a))):
        with server(*serve_args) as (url, _):
            status, _, body = call(url, "/readyz")
            assert status == 200 and json.loads(body)["model"] is not None, body
            answers[name] = [paste(url, **r) for r in requests]
            answers[name] += [call(url, "/v1/paste", fields, {"object": OBJ, "background": BG} if files is None else files)
                              for _, fields, files, _, _ in MALFORMED]
    for i, ((s1, h1, b1), (s2, h2, b2)) in enumerate(zip(answers["local"], answers["ray"])):
        assert s1 == s2, (i, s1, s2, b2[:300])
        if s1 == 200:
            np.testing.assert_array_equal(_array(b1), _array(b2))  # bit-identical images
            for h in ("x-composekit-seed", "x-composekit-box", "x-composekit-method", "x-composekit-steps"):
                assert h1.get(h) == h2.get(h), (i, h)
        else:
            assert json.loads(b1) == json.loads(b2), (i, b1, b2)  # the same JSON errors
    assert sum(s == 200 for s, _, _ in answers["ray"]) == len(requests)


def test_serve_on_ray_batches_through_serve_batch(tiny_model_dir, cluster):
    from test_serve import _expected, _load, call

    from composekit import Compositor

    expected = _expected(Compositor.from_pretrained(tiny_model_dir, device="cpu"))
    with _ray_serving(cluster, "--model", tiny_model_dir, "--device", "cpu", "--max-batch", 4,
                      "--max-wait-ms", 300) as (url, _):
        sizes = _load(url, 16, 8, expected, tolerance=1)
        assert max(sizes) > 1, sizes  # requests were composited together by @serve.batch
        _, _, body = call(url, "/metrics")
        assert "composekit_batch_size_count" in body.decode()


def test_serve_ray_flags_need_ray():
    for flags, text in ((["--replicas", 2], "--replicas needs --ray"), (["--address", "127.0.0.1:1"], "needs --ray"),
                        (["--ray", "--port", 0], "fixed --port"), (["--ray", "--max-replicas", 0], "max-replicas")):
        run = cli("serve", *flags)
        assert run.returncode != 0 and text in run.stderr and "Traceback" not in run.stderr, (flags, run.stderr)


def test_serve_run_application_builder():
    # `serve run composekit.apps.ray_serve:app key=value ...` and Serve config files call this builder.
    pytest.importorskip("ray.serve")
    from composekit import InputError
    from composekit.apps.ray_serve import RaySettings, app

    bound = app({"max_batch": "4", "max_wait_ms": "20", "queue_size": "8"})
    assert type(bound).__name__ == "Application"
    with pytest.raises(InputError, match="unknown argument"):
        app({"modle": "x"})
    with pytest.raises(InputError, match="max_batch must be an integer"):
        app({"max_batch": "four"})
    scale = RaySettings(min_replicas=1, max_replicas=3, gpus_per_replica=1, threads=2)
    options = scale.options(queue_size=8)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0,
                                            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
    assert RaySettings(replicas=2).options(queue_size=8)["num_replicas"] == 2


def test_ray_batch_takes_a_dataset_without_collecting_its_rows(shots, tmp_path):
    # A ray.data.Dataset is processed where its rows are: checked and skipped in the cluster, never take_all()'d
    # into the driver (only the small result records come back). Its own process and local cluster on 127.0.0.1.
    rows = [{"object": str(shots / "obj.png"), "background": str(shots / f"bg{i}.png"), "box": "10,10,60,60",
             "output": f"out{i}.png"} for i in (0, 1)]
    rows.append({"object": str(shots / "obj.png"), "background": str(shots / "bg3.png"), "box": "10,10",
                 "output": "bad.png"})
    (tmp_path / "out1.png").write_bytes(b"finished earlier")
    script = (
        "import json, sys\n"
        "from composekit.apps.ray_batch import _start_ray, ray_batch\n"
        "ray = _start_ray(None)\n"
        "import ray.data\n"
        "collected = []\n"
        "real = ray.data.Dataset.take_all\n"
        "ray.data.Dataset.take_all = lambda self, *a, **k: collected.append(1) or real(self, *a, **k)\n"
        "records = ray_batch(None, ray.data.from_items(json.loads(sys.argv[1])), sys.argv[2], workers=1, "
        "batch_size=2)\n"
        "print(json.dumps({'records': records, 'collected': len(collected)}))\n"
        "ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(rows), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **LOOPBACK_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    by_output = {r["output"]: r for r in out["records"]}
    assert by_output["out0.png"]["status"] == "ok" and (tmp_path / "out0.png").stat().st_size > 100
    assert by_output["out1.png"]["status"] == "skipped" and (tmp_path / "out1.png").read_bytes() == b"finished earlier"
    assert by_output["bad.png"]["status"] == "failed"
    assert "box must be four integers" in by_output["bad.png"]["error"]
    assert out["collected"] == 1  # one take_all: the result records; the input rows were never collected
