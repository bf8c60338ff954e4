"""``composekit serve``: one model behind a small HTTP API (FastAPI + uvicorn), with micro-batching.

Endpoints (all but ``/healthz`` need ``Authorization: Bearer KEY`` when an API key is set):

- ``POST /v1/paste`` — multipart form: files ``object``, ``background``, optional ``mask``; fields
  ``box`` ("x0,y0,x1,y1"), ``seed``, ``method``, ``steps``, ``guidance``, ``guidance_end``, ``eta``,
  ``context``, ``feather``, ``decode``, ``fidelity``, ``region``, ``margin``, ``harmonize``,
  ``shadow``. Answers the composite as ``image/png`` (``image/jpeg`` or ``image/webp`` when the
  ``Accept`` header asks), with ``X-Composekit-Seed``, ``-Box``, ``-Method``, ``-Steps``, ``-Timings``
  (JSON) and ``-Batch-Size`` headers. Errors are JSON ``{"error": {"type", "message"}}``: 400 a
  malformed form, 401 no or wrong key, 413 too large (upload or pixels), 415 not an image composekit
  reads, 422 values composekit refuses (the message says what to change), 503 queue full or
  shutting down (``Retry-After``), 504 over the per-request timeout.
- ``GET /healthz`` (alive), ``GET /readyz`` (model loaded, not draining), ``GET /metrics``
  (Prometheus text: requests by status, latency histogram, queue depth, batch sizes), and FastAPI's
  OpenAPI schema and docs (``/openapi.json``, ``/docs``).

How requests run: a bounded queue feeds one worker thread, which owns the model. With
``max_batch=1`` (the default) each request is one :meth:`Compositor.paste` call — the same call,
the same thread settings and so the same bytes as the Python API. With ``max_batch > 1`` the worker
takes the first queued request, waits up to ``max_wait_ms`` for more with the same options, and runs
them through :meth:`Compositor.paste_batch` (results within its tolerance of one-by-one calls).

No request can name a file or a model: images arrive as uploads and are decoded from bytes with
composekit's own limits; the model is fixed when the server starts. The server binds 127.0.0.1
unless told otherwise. On SIGTERM it stops taking requests (503), finishes those in flight, and exits.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, prometheus-client).
"""


import asyncio
import contextlib
import hmac
import inspect
import io
import json
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from composekit.core.options import Declared, option
from composekit.errors import ComposekitError, InputError

__all__ = ["ServeSettings", "create_app", "run"]

logger = logging.getLogger(__name__)

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}  # what responses may be encoded as


@dataclass(frozen=True)
class ServeSettings(Declared):
    """The server's limits and batching, validated when made (the CLI's serve flags are these fields)."""

    max_batch: int = option(1, "composite up to N requests together (1: off; responses equal the Python API's)",
                            lo=1, hi=256)
    max_wait_ms: float = option(10.0, "how long the first request of a batch waits for company, in ms", lo=0,
                                hi=60_000)
    max_upload_mb: float = option(20.0, "request body limit in MB", lo=0.001, hi=4096)
    queue_size: int = option(32, "requests waiting beyond this get 503", lo=1, hi=100_000)
    timeout_s: float = option(600.0, "per-request timeout in seconds, queueing included", lo=0.001, hi=86_400,
                              flag="--timeout")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /healthz "
                                 "(or set COMPOSEKIT_API_KEY)")
    max_request_megapixels: float = option(36.0, "decoded pixels one request's images may hold together, in "
                                           "megapixels (measured from their headers before decoding; 413 over it)",
                                           lo=0.001, hi=10_000)
    max_inflight_megapixels: float = option(72.0, "decoded pixels all requests in flight may hold together, in "
                                            "megapixels (503 while they would pass it)", lo=0.001, hi=100_000)
    header_timeout_s: float = option(10.0, "seconds a connection may take to send a request's headers (then it is "
                                     "closed)", lo=0.01, hi=3600, flag="--header-timeout")
    body_timeout_s: float = option(60.0, "seconds a request may take to send its body (then 408)", lo=0.01,
                                   hi=86_400, flag="--body-timeout")
    idle_timeout_s: float = option(5.0, "seconds an idle kept-alive connection stays open", lo=0.01, hi=3600,
                                   flag="--idle-timeout")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_key is not None and len(self.api_key) < 8:
            raise InputError("the API key must be a string of at least 8 characters")
        if self.max_inflight_megapixels < self.max_request_megapixels:
            raise InputError(f"max_inflight_megapixels ({self.max_inflight_megapixels:g}) must be at least "
                             f"max_request_megapixels ({self.max_request_megapixels:g})")


# -- the worker --------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request's composite, waiting for the worker."""

    images: dict[str, Any]  # decoded uploads (composekit.formats.images.Picture)
    box: tuple[int, int, int, int] | None
    seed: int | None
    options: dict[str, Any]
    future: Future = field(default_factory=Future)
    batch_size: int = 1
    abandoned: threading.Event = field(default_factory=threading.Event)  # its request timed out or left
    waiting: bool = False  # counted in the worker's queue room

    @property
    def key(self) -> str:
        """Requests with equal keys can share a batch (same options)."""
        return json.dumps(self.options, sort_keys=True)


class _ServeWorker:
    """One thread that owns the model and runs queued jobs, batching those with equal options."""

    def __init__(self, compositor: Any, settings: ServeSettings, metrics: "_Metrics") -> None:
        self.compositor, self.settings, self.metrics = compositor, settings, metrics
        # Unbounded: the room is counted in `waiting`, which a request leaves at once when it times out or its
        # client goes away (its job, still in the queue, is dropped unrun when the worker reaches it).
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.waiting = 0
        self.lock = threading.Lock()
        self.pending: list[_Job] = []  # taken from the queue but waiting for a batch with their options
        self.thread = threading.Thread(target=self._loop, name="composekit-worker", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> Future:
        with self.lock:
            if self.waiting >= self.settings.queue_size:
                raise queue.Full
            self.waiting += 1
            job.waiting = True
            self.metrics.queue_depth.set(self.waiting)
        self.queue.put_nowait(job)
        return job.future

    def _leave(self, job: _Job) -> None:
        """``job`` no longer waits (it started, or its request gave up): its room is free."""
        with self.lock:
            if job.waiting:
                job.waiting = False
                self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _next(self, block: bool, timeout: float | None = None) -> _Job | None | str:
        if self.pending:
            return self.pending.pop(0)
        try:
            return self.queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return "empty"

    def _loop(self) -> None:
        stopping = False
        while True:
            first = self._next(block=not stopping)
            if first is None:
                stopping = True
                continue
            if first == "empty":
                return  # stopping and nothing left
            batch = [first]
            if self.settings.max_batch > 1 and batchable(first):
                deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
                while len(batch) < self.settings.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        more = self.queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    (batch if more.key == first.key else self.pending).append(more)
            self._run(batch)
            del first, batch  # nothing of a finished batch stays alive while the worker waits for the next

    def _run(self, batch: list[_Job]) -> None:
        # Jobs whose request gave up (their future was cancelled) are dropped before any work.
        started = [job for job in batch if job.future.set_running_or_notify_cancel()]
        for job in batch:
            self._leave(job)
        batch = started
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        for job, result in zip(batch, run_jobs(self.compositor, batch)):
            job.images = {}  # the decoded uploads are not needed any more
            if isinstance(result, Abandoned):
                self.metrics.abandoned.labels("running").inc()
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    # The interface create_app uses (the Ray Serve replica offers the same three).
    def alive(self) -> bool:
        return self.thread.is_alive()

    async def composite(self, job: _Job) -> Any:
        try:
            future = self.submit(job)
        except queue.Full:
            raise QueueFull(f"{self.settings.queue_size} composites are already waiting; retry shortly") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The request timed out or its client left: dropped unrun if still queued (its room freed now);
            # if running, the sampler stops at its next step once every job of its batch is abandoned.
            job.abandoned.set()
            if future.cancel():
                self._leave(job)
                self.metrics.abandoned.labels("queued").inc()
            raise


class QueueFull(Exception):
    """No room for another request (answered 503 with Retry-After)."""


class Abandoned(ComposekitError):
    """Every request of a running batch gave up: the sampler was stopped between steps."""


def run_jobs(compositor: Any, batch: list[_Job]) -> list[Any]:
    """Composite jobs that share their options: one ``paste`` for one job (the Python API's bytes), else
    one ``paste_batch``. Returns a result or an exception per job, and records the batch size on each."""
    def stop_if_abandoned(step: int, timestep: int, latents: Any) -> None:
        if all(job.abandoned.is_set() for job in batch):
            raise Abandoned(f"every request of this batch gave up; stopped after step {step + 1}")

    try:
        if len(batch) == 1:
            job = batch[0]
            results: list[Any] = [compositor.paste(job.images["object"], job.images["background"], job.box,
                                                   mask=job.images.get("mask"), seed=job.seed, progress=False,
                                                   callback=stop_if_abandoned, **job.options)]
        else:
            jobs = [{"object": j.images["object"], "background": j.images["background"], "box": j.box,
                     "mask": j.images.get("mask"), "seed": j.seed} for j in batch]
            results = compositor.paste_batch(jobs, batch_size=len(batch), callback=stop_if_abandoned,
                                             **batch[0].options)
    except BaseException as exc:  # a whole-batch failure (bad options, a bug, all abandoned): every job gets it
        results = [exc] * len(batch)
    for job in batch:
        job.batch_size = len(batch)
    return results


def batchable(job: _Job) -> bool:
    """Whether a job may share a batch (the classic method runs one by one)."""
    return job.options.get("method") != "classic"


# -- metrics ------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("composekit_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("composekit_request_seconds", "Time to answer POST /v1/paste",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
                                 registry=self.registry)
        self.queue_depth = Gauge("composekit_queue_depth", "Composites waiting for the worker",
                                 registry=self.registry)
        self.batch_size = Histogram("composekit_batch_size", "Composites run together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.pixels = Gauge("composekit_decoded_megapixels", "Decoded megapixels held by requests in flight "
                            "(bounded by --max-inflight-megapixels)", registry=self.registry)
        self.abandoned = Counter("composekit_abandoned", "Composites whose request timed out or whose client left: "
                                 "dropped while queued, or stopped between steps while running", ["stage"],
                                 registry=self.registry)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- the application ----------------------------------------------------------------------------------


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _Guard:
    """Pure-ASGI front: draining (503), API key (401), the body size limit (413) and the body deadline (408)
    before and while the app runs. A request refused before its body is read is never sent ``100 Continue``
    (uvicorn sends it at the first read), and its body is not read when the client said it would wait
    (``Expect: 100-continue``) or announced more than 4x the limit: the answer closes the connection."""

    def __init__(self, app: Any, state: Any, settings: ServeSettings) -> None:
        self.app, self.state, self.settings = app, state, settings
        self.limit = int(settings.max_upload_mb * 1024 * 1024)

    def _too_large(self) -> Any:
        return _error(413, "PayloadTooLarge", f"the request body is over --max-upload-mb "
                      f"{self.settings.max_upload_mb:g} MB; send smaller images")

    async def _discard_body(self, receive: Any) -> None:
        """Read (and drop) what the client is still sending, up to 4x the limit and within the body deadline,
        before an early answer: closing a socket with unread bytes resets the connection, and the client would
        never see the answer."""
        async def drain() -> None:
            seen = 0
            while seen <= 4 * self.limit:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                seen += len(message.get("body", b""))

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drain(), self.settings.body_timeout_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        early = None
        if path != "/healthz" and self.state.draining:
            early = _error(503, "ShuttingDown", "the server is shutting down; retry on another instance",
                           {"Retry-After": "5"})
        elif path not in _PUBLIC and self.settings.api_key is not None:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.settings.api_key.encode()):
                early = _error(401, "Unauthorized", "send the API key as 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})
        announced = headers.get("content-length", "")
        if early is None and announced.isdigit() and int(announced) > self.limit:
            early = self._too_large()
        if early is not None:
            self.state.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(early.status_code)).inc()
            if headers.get("expect", "").lower() == "100-continue" or (announced.isdigit() and
                                                                       int(announced) > 4 * self.limit):
                # The client waits for "100 Continue" (never sent), or announced more than is worth reading:
                # nothing is read, and the connection cannot carry another request.
                early.headers["Connection"] = "close"
            else:
                await self._discard_body(receive)
            await early(scope, receive, send)
            return
        seen = 0
        over = slow = done = False
        started = False
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        async def counted_receive() -> dict:
            nonlocal seen, over, slow, done, deadline
            if done:  # the body is in: later reads only wait for a disconnect
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.settings.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                slow = True
                raise _BodyTooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge()
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over or slow:
                return  # the app's answer to a truncated body is replaced by 413 or 408 below
            started = True
            await send(message)

        self.state.inflight += 1
        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            over = True
        except _BodyTooSlow:
            slow = True
        finally:
            self.state.inflight -= 1
        if slow and not started:
            self.state.metrics.requests.labels(path if path in _ENDPOINTS else "other", "408").inc()
            await _error(408, "RequestTimeout", f"the request body did not arrive within the server's "
                         f"--body-timeout of {self.settings.body_timeout_s:g} s; send it faster or retry",
                         {"Connection": "close"})(scope, receive, send)
        elif over and not started:
            self.state.metrics.requests.labels("/v1/paste", "413").inc()
            await self._discard_body(receive)
            await self._too_large()(scope, receive, send)


_ENDPOINTS = ("/v1/paste", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")
# Answered without the API key: liveness, and the API's description (the docs page must load the schema
# before a user can enter a key in it; neither tells anything about the model or its inputs).
_PUBLIC = ("/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect")
_KINDS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 406: "NotAcceptable",
          408: "RequestTimeout", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "InvalidInput", 503: "Unavailable"}


class _BadRequest(Exception):
    pass


def _form_fields() -> dict[str, tuple[str, Any]]:
    """``/v1/paste``'s text fields: name -> (description, parser of the text). The options are the option
    schema's; a parser rejects malformed text (400), the compositor then checks ranges (422)."""
    from composekit.core.geometry import parse_box
    from composekit.core.options import SEED, PasteOptions

    fields: dict[str, tuple[str, Any]] = {
        "box": ("x0,y0,x1,y1 in background pixels (x1, y1 exclusive); or send a mask", parse_box),
        "seed": (SEED.describe(), SEED.from_text),
        "method": ("generative (default with a model) or classic (default without)", str),
    }
    for name, spec in PasteOptions.specs().items():
        if spec.cli:
            only = "" if len(spec.methods) > 1 else f"{spec.methods[0]} method: "
            fields[name] = (only + spec.describe(), spec.from_text)
    return fields


async def _watch_client(request: Any, task: Any, gone: asyncio.Event, every_s: float = 0.25) -> None:
    """Cancel ``task`` (the request's composite) when the client disconnects before it is done."""
    while not task.done():
        if await request.is_disconnected():
            gone.set()
            task.cancel()
            return
        await asyncio.sleep(every_s)


def _status_for(exc: ComposekitError) -> tuple[int, str]:
    """HTTP status for a composekit error raised while handling a request."""
    from composekit.errors import BackendUnavailableError, ModelError, NumericalError

    text = str(exc)
    if isinstance(exc, InputError):
        if "over the limit" in text and "pixels" in text:
            return 413, "ImageTooLarge"
        if "not a readable image" in text or "must be a PIL image" in text:
            return 415, "UnsupportedImage"
        return 422, "InvalidInput"
    if isinstance(exc, NumericalError):
        return 500, "NumericalError"
    if isinstance(exc, BackendUnavailableError):
        return 503, "BackendUnavailable"
    if isinstance(exc, ModelError):
        return 500, "ModelError"
    return 500, type(exc).__name__


def create_app(compositor: Any, settings: ServeSettings | None = None, runner: Any = None) -> Any:
    """The ASGI application for ``compositor`` (the :class:`_Guard` in front of a FastAPI app).

    ``runner`` runs the composites: by default a :class:`_ServeWorker` thread started with the app; the Ray
    Serve replica passes itself (``alive()`` and ``async composite(job)``, batching through
    ``@serve.batch``).
    """
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from composekit import __version__
    from composekit.apps.http_limits import PixelBudget, give_back_memory
    from composekit.apps.openapi import rewrite
    from composekit.formats.images import image_size, load_picture

    settings = settings or ServeSettings()

    class State:
        draining = False
        inflight = 0  # requests inside the app (not counting those answered by the guard)
        metrics = _Metrics()
        worker: Any = runner
        pixels = PixelBudget(int(settings.max_request_megapixels * 1e6), int(settings.max_inflight_megapixels * 1e6))
        # Decoding uploads and encoding results (seconds for large images) run here, never on the event loop.
        io = ThreadPoolExecutor(2, thread_name_prefix="composekit-io")

    state = State()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        try:
            if runner is not None:
                yield
                state.draining = True
                return
            state.worker = _ServeWorker(compositor, settings, state.metrics)
            yield
            state.draining = True
            await asyncio.get_running_loop().run_in_executor(None, state.worker.stop, settings.timeout_s)
        finally:
            state.io.shutdown(wait=False)

    api = FastAPI(title="composekit", version=__version__, lifespan=lifespan,
                  description="Generative object compositing with an exact-background guarantee.")

    def openapi() -> dict:
        if api.openapi_schema is None:
            api.openapi_schema = rewrite(get_openapi(title=api.title, version=api.version, description=api.description,
                                                     routes=api.routes),
                                         secured=settings.api_key is not None, public=_PUBLIC)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's and Starlette's own errors (404, 405, a multipart body that cannot be parsed, ...) in the
        same envelope as composekit's, and counted."""
        status = exc.status_code
        state.metrics.requests.labels(request.url.path if request.url.path in _ENDPOINTS else "other",
                                      str(status)).inc()
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)[:300]
        if status == 400:
            detail = f"malformed request: {detail}. Send a multipart form with files 'object' and 'background'"
        return _error(status, _KINDS.get(status, "HTTPError"), detail[:500], getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        state.metrics.requests.labels(request.url.path if request.url.path in _ENDPOINTS else "other", "400").inc()
        return _error(400, "BadRequest", f"malformed request: {problems}. Send a multipart form with files 'object' "
                      "and 'background' and a field 'box' (x0,y0,x1,y1)")

    @api.get("/healthz")
    async def healthz() -> dict:
        state.metrics.requests.labels("/healthz", "200").inc()
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        ready = state.worker is not None and state.worker.alive() and not state.draining
        state.metrics.requests.labels("/readyz", "200" if ready else "503").inc()
        if not ready:
            return _error(503, "NotReady", "the model is not loaded or the server is shutting down")
        backend = compositor.backend
        return JSONResponse({"status": "ready", "method": "generative" if backend is not None else "classic",
                             "model": backend.info.source if backend is not None else None,
                             "backend": backend.name if backend is not None else None,
                             "max_batch": settings.max_batch})

    @api.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.text()
        state.metrics.requests.labels("/metrics", "200").inc()
        return Response(body, media_type=content_type)

    fields = _form_fields()

    async def paste(request: Request, object: UploadFile, background: UploadFile,  # noqa: A002
                    mask: UploadFile | None = None, **form: str | None) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await _paste(request, object, background, mask, form)
            status = response.status_code
            return response
        finally:
            seconds = time.perf_counter() - start
            state.metrics.requests.labels("/v1/paste", str(status)).inc()
            state.metrics.latency.observe(seconds)
            client = request.client.host if request.client else "-"
            logger.info("POST /v1/paste %s %.3f s from %s", status, seconds, client)

    # The form fields are the option schema's (composekit.core.options): FastAPI reads this signature.
    paste.__signature__ = inspect.Signature([
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("object", inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile,
                          default=File(..., description="the object image (PNG with alpha = a cut-out)")),
        inspect.Parameter("background", inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile,
                          default=File(..., description="the background image")),
        inspect.Parameter("mask", inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile | None,
                          default=File(None, description="background-sized mask; white = editable")),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                            default=Form(None, description=text)) for name, (text, _) in fields.items()),
    ])
    # The schema's form, statuses and bearer scheme are composekit.apps.openapi's; the guard checks the key.
    api.post("/v1/paste")(paste)

    async def _paste(request: Any, object_file: Any, background_file: Any, mask_file: Any,
                     form: dict[str, str | None]) -> Response:
        try:
            values = {name: fields[name][1](text) for name, text in form.items() if text not in (None, "")}
        except InputError as exc:
            return _error(400, "BadRequest", str(exc))
        box, seed, method = values.pop("box", None), values.pop("seed", None), values.pop("method", None)
        options: dict[str, Any] = {**values, "method": method} if method is not None else values
        uploads = {"object": await object_file.read(), "background": await background_file.read()}
        if mask_file is not None:
            uploads["mask"] = await mask_file.read()
        if box is None and "mask" not in uploads:
            return _error(400, "BadRequest", "give a field 'box' (x0,y0,x1,y1) or a file 'mask'")
        loop = asyncio.get_running_loop()
        try:  # what decoding will cost, from the headers alone (415 for what is not an image)
            sizes = await loop.run_in_executor(state.io, lambda: {n: image_size(d, n) for n, d in uploads.items()})
        except InputError as exc:
            return _error(*_status_for(exc), str(exc))
        pixels = sum(w * h for w, h in sizes.values())
        refused = state.pixels.take(pixels, ", ".join(f"{n} {w}x{h}" for n, (w, h) in sizes.items()))
        if refused is not None:
            code, kind, message = refused
            return _error(code, kind, message, {"Retry-After": "1"} if code == 503 else None)
        state.metrics.pixels.set(state.pixels.held / 1e6)
        try:
            return await _composite(request, uploads, box, seed, options, loop)
        finally:
            state.pixels.give(pixels)
            state.metrics.pixels.set(state.pixels.held / 1e6)
            if pixels >= _TRIM_PIXELS:  # give a large request's memory back to the system
                await loop.run_in_executor(state.io, give_back_memory)

    async def _composite(request: Any, uploads: dict[str, bytes], box: Any, seed: Any, options: dict[str, Any],
                         loop: Any) -> Response:
        try:  # decoded once, here, off the event loop: 415/413 before queueing; the compositor takes the pictures
            images = await loop.run_in_executor(state.io, lambda: {n: load_picture(d, n) for n, d in uploads.items()})
        except InputError as exc:
            return _error(*_status_for(exc), str(exc))
        del uploads
        job = _Job(images, box, seed, options)
        del images
        task = asyncio.ensure_future(state.worker.composite(job))
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_client(request, task, gone))
        try:
            result = await asyncio.wait_for(task, timeout=settings.timeout_s)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server itself is cancelling this handler
            return _error(499, "ClientClosedRequest", "the client closed the connection; the composite was dropped")
        except QueueFull as exc:
            return _error(503, "QueueFull", str(exc), {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return _error(504, "Timeout", f"the composite took longer than the server's {settings.timeout_s:g} s "
                          "timeout; use fewer steps or retry later")
        except ComposekitError as exc:
            return _error(*_status_for(exc), str(exc))
        finally:
            watcher.cancel()
        media = _negotiate(request.headers.get("accept", ""))
        if media is None:
            return _error(406, "NotAcceptable", f"the Accept header excludes every type this server answers with "
                          f"({', '.join(FORMATS)}); accept one of them")
        encoded = await loop.run_in_executor(state.io, _encode, result.image, FORMATS[media])
        headers = {"X-Composekit-Box": ",".join(map(str, result.box)),
                   "X-Composekit-Method": result.method, "X-Composekit-Steps": str(result.steps),
                   "X-Composekit-Timings": json.dumps({k: round(v, 6) for k, v in result.timings.items()},
                                                      separators=(",", ":")),
                   "X-Composekit-Batch-Size": str(job.batch_size)}
        if result.seed is not None:  # the classic method draws no noise
            headers["X-Composekit-Seed"] = str(result.seed)
        return Response(encoded, media_type=media, headers=headers)

    return _Guard(api, state, settings)


_TRIM_PIXELS = 4_000_000  # after a request of this many decoded pixels or more, memory is given back


def _encode(image: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha channel
    image.save(buf, format=fmt)
    return buf.getvalue()


_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")  # RFC 9110's qvalue: 0..1, at most 3 decimals


def _negotiate(accept: str) -> str | None:
    """The image type to answer with for an ``Accept`` header (RFC 9110): media types case-insensitive,
    parameters and spaces allowed, ``q`` in 0..1 (an entry with a malformed ``q`` such as ``inf`` is
    ignored, ``q=0`` excludes), an exact type before ``image/*`` before ``*/*``; the highest q wins, ties
    by the header's order. No header, or none of ours and no wildcard: PNG. None when every one of
    ours is excluded (answered 406)."""
    if not accept.strip():
        return "image/png"
    quality: dict[str, tuple[int, float, int]] = {}  # media range -> (specificity, q, position)
    for position, part in enumerate(accept.split(",")[:64]):
        kind, *params = (p.strip() for p in part.split(";"))
        kind = kind.lower()
        q: float | None = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.fullmatch(value) else None
        if q is None or not kind:
            continue
        quality[kind] = (2 if kind in FORMATS else 1 if kind == "image/*" else 0, q, position)
    ranked, excluded = [], set()
    for preference, media in enumerate(FORMATS):  # PNG first on ties
        for key in (media, "image/*", "*/*"):
            if key in quality:
                _, q, position = quality[key]
                if q > 0:
                    ranked.append((q, -position, -preference, media))
                else:
                    excluded.add(media)
                break
    if ranked:
        return max(ranked)[-1]
    # Nothing of ours asked for: the first type not explicitly excluded (a server may disregard Accept, but
    # never sends what the client excluded).
    return next((media for media in FORMATS if media not in excluded), None)


def run(compositor: Any, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "warning", on_ready: Any = None) -> None:
    """Serve until SIGTERM/SIGINT: new requests then get 503 while those in flight finish."""
    import uvicorn

    app = create_app(compositor, settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining:  # a second signal: stop now
                super().handle_exit(sig, frame)
                return
            # Drain: new requests get 503 while the listener stays open; once those in flight have
            # finished (or the request timeout has passed), uvicorn shuts down as usual.
            app.state.draining = True
            deadline = time.monotonic() + settings.timeout_s

            def wait_then_exit() -> None:
                while app.state.inflight > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                uvicorn.Server.handle_exit(self, sig, frame)

            threading.Thread(target=wait_then_exit, name="composekit-drain", daemon=True).start()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if on_ready is not None and self.started:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                on_ready(bound[0][1] if bound else port)

    from composekit.apps.http_limits import timed_protocol

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(
        settings.timeout_s), lifespan="on", http=timed_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.idle_timeout_s)  # type: ignore[arg-type]
    Server(config).run()
