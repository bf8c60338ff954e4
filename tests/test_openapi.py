"""The service's OpenAPI document tells the truth: every status it answers, the error envelope, the content
types, the bearer scheme; and schemathesis (every check, a bounded number of cases) finds nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve import KEY, call, serving

pytest.importorskip("fastapi")


def _spec(url: str) -> dict:
    status, _, body = call(url, "/openapi.json")
    assert status == 200
    return json.loads(body)


def test_the_schema_lists_what_the_server_answers(tiny_model_dir):
    # Finding 10: 400 and 415 were not listed, /metrics was documented as JSON, 422 had FastAPI's shape, no
    # bearer scheme; schema-valid requests (an empty file, mask=null) were refused.
    with serving("--model", tiny_model_dir, "--device", "cpu", "--api-key", KEY) as (url, _):
        spec = _spec(url)
        paste = spec["paths"]["/v1/paste"]["post"]
        for code in ("200", "400", "401", "406", "408", "413", "415", "422", "500", "503", "504"):
            assert code in paste["responses"], code
        for code, answer in paste["responses"].items():
            if code != "200":
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        assert set(paste["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
        assert "HTTPValidationError" not in json.dumps(spec)
        assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer", "description": "the server's --api-key"}
        assert paste["security"] == [{"bearer": []}] and "security" not in spec["paths"]["/healthz"]["get"]
        form = paste["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["steps"]["type"] == "integer" and form["properties"]["steps"]["maximum"] == 1000
        assert form["properties"]["eta"] == {**form["properties"]["eta"], "type": "number", "minimum": 0.0,
                                             "maximum": 1.0}
        assert form["properties"]["object"]["minLength"] == 1  # an empty file is not schema-valid
        assert "anyOf" not in form["properties"]["mask"]  # no null: a mask is a file or absent
        # The docs page works with a key: it loads the (public) schema; the operations then need the key.
        assert call(url, "/docs")[0] == 200 and b"/openapi.json" in call(url, "/docs")[2]
        assert call(url, "/metrics")[0] == 401 and call(url, "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        # What the schema says metrics are is what they are.
        assert call(url, "/metrics", headers={"Authorization": f"Bearer {KEY}"})[1]["content-type"].startswith("text/plain")


@pytest.mark.parametrize("secured", [True, False], ids=["api-key", "open"])
def test_schemathesis_finds_nothing(tiny_model_dir, tmp_path, secured):
    pytest.importorskip("schemathesis")
    key = ("--api-key", KEY) if secured else ()
    with serving("--model", tiny_model_dir, "--device", "cpu", "--timeout", 120, *key) as (url, _):
        command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
                   "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
                   "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "40", "--seed", "20261203",
                   "--report", "junit", "--report-dir", str(tmp_path)]
        if secured:
            command += ["-H", f"Authorization: Bearer {KEY}"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-3000:]
        # It really spoke to the server, with malformed forms (400), files that are not images (415) and values
        # composekit refuses (422). (Schema-valid composites are rare in its cases: a random image is tiny, and the
        # box must lie inside it; the other tests compare composites.)
        metrics = call(url, "/metrics", headers={"Authorization": f"Bearer {KEY}"})[2].decode()
        for status in (400, 415, 422):
            assert f'composekit_requests_total{{endpoint="/v1/paste",status="{status}"}}' in metrics, metrics
