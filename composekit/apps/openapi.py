"""The HTTP service's OpenAPI document, written to say what the server really does.

FastAPI's generated schema describes its defaults, not composekit's answers (it lists a 422 in its own
shape that the service never sends, form fields as untyped strings, no error bodies). This module
rewrites it from the service's own declarations: the form fields' types, ranges and choices come from
the option schema (``composekit.core.options``), every status the service answers is listed with the
one error envelope, ``/metrics`` is Prometheus text, and the bearer scheme is declared when a key is set.

What a schema cannot say: that a file must decode as an image (415 otherwise), that the box must lie
inside the background and the options must suit the method (422), that the decoded pixels must fit
the server's budget (413). Those answers are listed for ``POST /v1/paste`` with their meaning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ERROR_SCHEMA", "field_schema", "rewrite"]

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["type", "message"], "additionalProperties": False,
        "properties": {"type": {"type": "string", "description": "the kind of error, e.g. InvalidInput"},
                       "message": {"type": "string", "description": "what was wrong and how to fix it"}}}},
}

# Every error status the service answers, and when.
_WHY = {
    400: "malformed request: not a multipart form, a field that does not parse, a missing file or box",
    401: "the API key is missing or wrong (send 'Authorization: Bearer <key>')",
    406: "the Accept header excludes PNG, JPEG and WebP",
    408: "the request body did not arrive within the server's --body-timeout",
    413: "too large: the body (--max-upload-mb) or the decoded pixels of this request (--max-request-megapixels, "
         "--max-inflight-megapixels)",
    415: "a file is not an image composekit reads (PNG, JPEG, WebP, BMP, TIFF), or is truncated",
    422: "values composekit refuses: a box outside the background, an option the method does not take, more steps "
         "than the model's schedule, ...",
    500: "the model failed (e.g. a non-finite result)",
    503: "the queue is full, the decoded-pixel budget of requests in flight is taken, or the server is shutting "
         "down (see Retry-After)",
    504: "the composite took longer than the server's --timeout",
}
_PASTE_ERRORS = (400, 401, 406, 408, 413, 415, 422, 500, 503, 504)
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
_HEADERS = {
    "X-Composekit-Seed": "the seed used (absent for the classic method)",
    "X-Composekit-Box": "the box, x0,y0,x1,y1",
    "X-Composekit-Method": "generative or classic",
    "X-Composekit-Steps": "DDIM steps run",
    "X-Composekit-Timings": "seconds per stage, JSON",
    "X-Composekit-Batch-Size": "composites run together with this one",
}


def field_schema(spec: Any) -> dict[str, Any]:
    """The JSON schema of one option declared in ``composekit.core.options`` (a form field's value)."""
    if spec.choices is not None:
        out: dict[str, Any] = {"type": "string", "enum": list(spec.choices)}
    elif spec.kind is int:
        out = {"type": "integer"}
    elif spec.kind is float:
        out = {"type": "number"}
    elif spec.kind is bool:
        out = {"type": "boolean"}
    else:
        out = {"type": "string"}
    if spec.kind in (int, float):
        if spec.lo is not None:
            out["minimum"] = int(spec.lo) if spec.kind is int else spec.lo
        if spec.hi is not None:
            out["maximum"] = int(spec.hi) if spec.kind is int else spec.hi
    if spec.default is not None and spec.kind is not bool:
        out["default"] = spec.default
    out["description"] = spec.describe()
    return out


def _form_schema() -> dict[str, Any]:
    """``POST /v1/paste``'s multipart body: the files and the option schema's fields."""
    from composekit.core.options import METHODS, SEED, PasteOptions

    binary = {"type": "string", "format": "binary", "minLength": 1}
    props: dict[str, Any] = {
        "object": {**binary, "description": "the object image (PNG with alpha = a cut-out)"},
        "background": {**binary, "description": "the background image"},
        "mask": {**binary, "description": "background-sized mask, white = editable (instead of box)"},
        "box": {"type": "string", "pattern": r"^[0-9]{1,9},[0-9]{1,9},[0-9]{1,9},[0-9]{1,9}$",
                "description": "x0,y0,x1,y1 in background pixels (x1, y1 exclusive); or send a mask"},
        "seed": field_schema(SEED),
        "method": {"type": "string", "enum": list(METHODS),
                   "description": "generative (default with a model) or classic (default without)"},
    }
    for name, spec in PasteOptions.specs().items():
        if spec.cli:
            only = "" if len(spec.methods) > 1 else f"{spec.methods[0]} method: "
            props[name] = {**field_schema(spec), "description": only + spec.describe()}
    return {"type": "object", "required": ["object", "background"], "properties": props,
            "anyOf": [{"required": ["box"]}, {"required": ["mask"]}]}


def _error(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _WHY[status],
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status == 503:
        out["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def rewrite(schema: dict[str, Any], *, secured: bool, public: tuple[str, ...]) -> dict[str, Any]:
    """FastAPI's generated ``schema`` made true to the service (see the module's docstring); ``secured``
    when an API key is set, ``public`` the paths that need none."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in [n for n in schemas if n in ("HTTPValidationError", "ValidationError") or n.startswith("Body_")]:
        del schemas[name]
    schemas["Error"] = ERROR_SCHEMA
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "the server's --api-key"}}
    else:
        components.pop("securitySchemes", None)
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            guarded = secured and path not in public
            if guarded:
                op["security"] = [{"bearer": []}]
            else:
                op.pop("security", None)
            responses: dict[str, Any] = {}
            if path == "/v1/paste":
                op["requestBody"] = {"required": True, "content": {
                    "multipart/form-data": {"schema": _form_schema()}}}
                responses["200"] = {
                    "description": "the composite (PNG unless the Accept header asks for JPEG or WebP)",
                    "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES},
                    "headers": {k: {"schema": {"type": "string"}, "description": v} for k, v in _HEADERS.items()}}
                codes = [c for c in _PASTE_ERRORS if guarded or c != 401]
            elif path == "/metrics":
                responses["200"] = {"description": "Prometheus text exposition format",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
                codes = [401, 503] if guarded else [503]
            elif path == "/healthz":
                responses["200"] = {"description": "the process is alive", "content": {"application/json": {
                    "schema": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}
                codes = []
            else:  # /readyz
                responses["200"] = {"description": "the model is loaded and the server takes requests",
                                    "content": {"application/json": {"schema": {
                                        "type": "object", "required": ["status"],
                                        "properties": {"status": {"const": "ready"}}}}}}
                codes = [401, 503] if guarded else [503]
            for code in codes:
                responses[str(code)] = _error(code)
            op["responses"] = responses
    return schema
