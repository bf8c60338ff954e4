"""``composekit serve --ray``: the same HTTP app as a Ray Serve deployment (replicas, autoscaling, GPUs).

Each replica loads the model once and serves :func:`composekit.apps.serve.create_app`'s endpoints; the
composites go through a ``@serve.batch`` method, so concurrent requests with the same options share a
:meth:`Compositor.paste_batch` call (one request alone is one :meth:`Compositor.paste`, the Python
API's bytes). Ray Serve's proxy spreads requests over the replicas and, with autoscaling, adds and
removes replicas by the number of requests in flight.

From the command line (a local cluster on 127.0.0.1, or ``--address`` to join one)::

    composekit serve --ray --model ./my-model --replicas 2 --max-batch 4

or with Ray's own tools, through the application builder :func:`app`::

    serve run composekit.apps.ray_serve:app model=./my-model max_batch=4

Needs the ``serve`` and ``ray`` extras (``ray[serve]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from composekit.core.options import THREADS, Declared, option
from composekit.errors import BackendUnavailableError, InputError, install_hint

__all__ = ["app", "deployment", "RaySettings"]

logger = logging.getLogger(__name__)

APP_NAME = "composekit"


@dataclass(frozen=True)
class RaySettings(Declared):
    """Replicas and resources of the deployment, validated when made (the CLI's --ray flags are these fields).

    ``min_replicas`` or ``max_replicas`` turn on autoscaling (by requests in flight per replica)."""

    replicas: int = option(1, "with --ray: replicas, each holding the model", lo=1, hi=10_000)
    min_replicas: int | None = option(None, "with --ray: autoscale from this many replicas", lo=0, hi=10_000)
    max_replicas: int | None = option(None, "with --ray: autoscale up to this many replicas", lo=1, hi=10_000)
    gpus_per_replica: float = option(0.0, "with --ray: GPUs per replica", lo=0, hi=1024)
    cpus_per_replica: float = option(1.0, "with --ray: CPUs per replica (Ray sets its threads to this unless "
                                     "--threads)", lo=0, hi=1024)
    target_ongoing_requests: float = option(2.0, "with --ray autoscaling: requests in flight per replica to aim "
                                            "for", lo=0.01, hi=10_000, cli=False)
    threads: int | None = option(None, THREADS.help, lo=THREADS.lo, hi=THREADS.hi, cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.autoscaling is not None and self.autoscaling["max_replicas"] < max(self.autoscaling["min_replicas"], 1):
            raise InputError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas}) and >= 1")

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        """Ray Serve's autoscaling config, or None for a fixed number of replicas."""
        if self.min_replicas is None and self.max_replicas is None:
            return None
        lo = 1 if self.min_replicas is None else self.min_replicas
        hi = max(lo, 1) if self.max_replicas is None else self.max_replicas
        return {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": self.target_ongoing_requests}

    def options(self, queue_size: int) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}
        if self.threads is not None:  # torch and OpenMP read it when the replica imports them
            actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(self.threads)}}
        out: dict[str, Any] = {"ray_actor_options": actor, "max_queued_requests": queue_size}
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling
        else:
            out["num_replicas"] = self.replicas
        return out


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailableError(f"composekit serve --ray needs Ray Serve; {install_hint('ray')}") from exc
    return serve


def deployment(model: str | None, load: dict[str, Any] | None = None, settings: Any = None,
               ray_settings: RaySettings | None = None) -> Any:
    """The bound Ray Serve application: one ingress deployment whose replicas each hold the model.

    ``settings`` is a :class:`composekit.apps.serve.ServeSettings` (its ``max_batch`` and ``max_wait_ms``
    become ``@serve.batch``'s size and wait); ``load`` goes to ``from_pretrained``; ``ray_settings``
    sets replicas/autoscaling and resources (default: what a Serve config file says, else one replica).
    """
    serve = _ray_serve()
    from composekit.apps.serve import ServeSettings

    settings = settings or ServeSettings()

    @serve.deployment(name="Composekit", max_ongoing_requests=max(2 * settings.max_batch, 4))
    @serve.ingress()
    class Composekit:
        """One replica: the model, the FastAPI app in front of it, and a batching queue."""

        def __init__(self, model: str | None, load: dict[str, Any], settings: ServeSettings) -> None:
            from composekit import Compositor
            from composekit.apps.serve import create_app

            self.compositor = Compositor.from_pretrained(model, **load) if model else Compositor()
            self.settings = settings
            self.asgi = create_app(self.compositor, settings, runner=self)
            self.composite_batch.set_max_batch_size(settings.max_batch)
            self.composite_batch.set_batch_wait_timeout_s(settings.max_wait_ms / 1000.0)

        def __serve_build_asgi_app__(self) -> Any:
            return self.asgi

        # The runner interface create_app calls.
        def alive(self) -> bool:
            return True

        async def composite(self, job: Any) -> Any:
            result = await self.composite_batch(job)
            if isinstance(result, BaseException):  # serve.batch hands items back; a job's error is raised here
                raise result
            return result

        @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
        async def composite_batch(self, jobs: list[Any]) -> list[Any]:
            """Jobs that arrived together: grouped by options (and the classic method one by one), each group
            one ``paste``/``paste_batch`` call in a worker thread so the event loop keeps answering."""
            from composekit.apps.serve import batchable, run_jobs

            groups: dict[Any, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault(job.key if batchable(job) else ("alone", i), []).append(i)
            results: list[Any] = [None] * len(jobs)
            for indices in groups.values():
                group = [jobs[i] for i in indices]
                self.asgi.state.metrics.batch_size.observe(len(group))
                for i, result in zip(indices, await asyncio.to_thread(run_jobs, self.compositor, group)):
                    results[i] = result
            return results

    options = ray_settings.options(settings.queue_size) if ray_settings is not None else {}
    return Composekit.options(**options).bind(model, dict(load or {}), settings)


def app(args: dict[str, str]) -> Any:
    """Application builder for ``serve run composekit.apps.ray_serve:app key=value ...`` (and Serve config files).

    Keys: ``model`` (omit for the classic method), ``backend``, ``device``, ``dtype``, ``max_batch``,
    ``max_wait_ms``, ``max_upload_mb``, ``queue_size``, ``timeout_s``, ``api_key``, ``offline``, ``vae``.
    Replicas, autoscaling, GPUs and thread settings (``runtime_env``) come from the config file's
    ``deployments`` section (deployment name ``Composekit``).
    """
    from composekit.apps.serve import ServeSettings

    specs = {name: spec for name, spec in ServeSettings.specs().items() if name != "api_key"}
    known = {"model", "backend", "device", "dtype", "vae", "api_key", "offline", *specs}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: spec.parse(args[name]) for name, spec in specs.items() if name in args}
    settings = ServeSettings(**values, api_key=args.get("api_key") or os.environ.get("COMPOSEKIT_API_KEY") or None)
    load = {k: args[k] for k in ("backend", "device", "dtype", "vae") if k in args}
    if str(args.get("offline", "")).lower() in ("1", "true", "yes"):
        load["local_files_only"] = True
    return deployment(args.get("model"), load, settings)


def run(model: str | None, load: dict[str, Any], settings: Any, ray_settings: RaySettings, *, host: str,
        port: int, address: str | None = None, on_ready: Any = None) -> None:
    """Start (or join) Ray, deploy, and serve until SIGTERM/SIGINT; then remove the application."""
    import signal
    import threading

    serve = _ray_serve()
    from composekit.apps.ray_batch import _start_ray

    ray = _start_ray(address)
    started_serve = deployed = False
    try:
        running = _running_serve_address()
        if running is not None and running != (host, port):
            raise InputError(f"Ray Serve already runs on this cluster with its proxy on {running[0]}:{running[1]} "
                             f"(fixed when Serve started); use --host {running[0]} --port {running[1]}, or "
                             "`serve shutdown` first")
        started_serve = running is None
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        serve.run(deployment(model, load, settings, ray_settings), name=APP_NAME, route_prefix="/", blocking=False)
        deployed = True
        if on_ready is not None:
            on_ready(port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            if started_serve:  # Serve was ours: remove it (and its proxy); else only our application
                serve.shutdown()
            elif deployed:
                serve.delete(APP_NAME)
        finally:
            if address is None:
                ray.shutdown()


def _running_serve_address() -> tuple[str, int] | None:
    """(host, port) of the HTTP proxy when Ray Serve already runs on the cluster, else None."""
    from ray.serve.exceptions import RayServeException

    try:
        from ray.serve.context import _get_global_client
    except ImportError:  # a Ray without this (private) helper: Serve's own log line says what it reuses
        return None
    try:
        config = _get_global_client().http_config
    except RayServeException:
        return None
    return str(config.host), int(config.port)
