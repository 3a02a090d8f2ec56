"""Ray Serve: the same FastAPI app as an ingress deployment; each replica holds its pipelines and
their Engine, so requests routed to a replica share its UNet calls step by step (Ray's
@serve.batch would batch whole requests, which the engine already does per step).

    fastdiff serve --ray --autoscale 1,4          # or: serve run serve_config.yaml
    serve run fastdiff.serving:app model=small    # the application builder below

Ray routes each HTTP request to a replica, restarts replicas whose process dies or whose health
check (the engines' worker threads) fails, and, with autoscaling, adds replicas when the
ongoing requests per replica pass the engine's batch size.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from ray import serve

from fastdiff.serving.server import Limits, create_app, load_pipelines


# Ray reads this in each proxy's process (inherited from the environment that starts the cluster)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "fastdiff.serving.ray_serve:proxy_middlewares"


class _ReplicaLost:
    """Proxy middleware: when the replica serving a request dies under it, Ray's proxy sends no
    response and uvicorn answers a bare 500; this answers a JSON 503 with Retry-After instead (the
    request may be retried elsewhere). The app's own responses pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            if started:
                raise
        if not started:
            body = json.dumps({"error": "server: the replica serving this request stopped; retry",
                               "field": "server"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """Ray Serve's proxy callback ($RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH = PROXY_CALLBACK)."""
    from starlette.middleware import Middleware

    return [Middleware(_ReplicaLost)]


class ServeArgs(BaseModel):
    """The application's arguments (a config file's `args:`, or `serve run ... key=value`).

    model: a diffusers folder or an embedded default (toyworld: trained; mobilediffusion, small:
    untrained; default $FASTDIFF_MODEL or toyworld). quantize: "int8" for int8 UNet weights (default
    float). threads: torch threads per replica (default: Ray's OMP_NUM_THREADS, the replica's num_cpus). api_key: default $FASTDIFF_API_KEY in the replica.
    The limits default to fastdiff.serving.Limits'.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    dtype: str = "fp32"
    quantize: Literal["int8"] | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    threads: int | None = None
    api_key: str | None = None
    max_body_bytes: int | None = None
    max_steps: int | None = None
    max_pixels: int | None = None
    max_queue: int | None = None

    def limits(self) -> Limits:
        given = {name: getattr(self, name) for name in ("max_body_bytes", "max_steps", "max_pixels", "max_queue")}
        return Limits(**{name: value for name, value in given.items() if value is not None})


@serve.deployment(health_check_period_s=5, health_check_timeout_s=10)
@serve.ingress()  # no app yet: each replica builds its own in __serve_build_asgi_app__
class FastdiffServer:
    def __init__(self, args: dict):
        args = ServeArgs.model_validate(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.fastdiff_app = create_app(load_pipelines(args.model, args.dtype, args.quantize), api_key=args.api_key, limits=args.limits(),
                              max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)

    def __serve_build_asgi_app__(self):
        return self.fastdiff_app

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes it replace the replica."""
        if not self.fastdiff_app.state.service.healthy():
            raise RuntimeError("fastdiff: an engine's worker has stopped")


def build(args: ServeArgs, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
          num_cpus: float = 1, num_gpus: float = 0, drain_timeout_s: float = 30.0):
    """The bound application: a fixed number of replicas, or autoscaling between (min, max) on the
    ongoing requests per replica (target: the engine's batch size)."""
    limits = args.limits()
    options = dict(ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                   # let requests reach the replica's own queue (and its 429) instead of Ray's default of 5
                   max_ongoing_requests=args.max_batch + limits.max_queue,
                   graceful_shutdown_timeout_s=drain_timeout_s)
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": args.max_batch}
    else:
        options["num_replicas"] = replicas or 1
    return FastdiffServer.options(**options).bind(args.model_dump())


def app(args: dict):
    """Application builder for `serve run fastdiff.serving:app [key=value ...]` and config files
    (import_path: fastdiff.serving:app; `args:` as ServeArgs); replicas and resources come from
    the config's `deployments:` section (name: FastdiffServer)."""
    return build(ServeArgs.model_validate(args))


def serve_forever(args: ServeArgs, *, host: str, port: int, replicas: int | None, autoscale: tuple[int, int] | None,
                  num_cpus: float, num_gpus: float, drain_timeout_s: float, name: str = "fastdiff") -> int:
    """Start (or join, with $RAY_ADDRESS) a Ray cluster, deploy, and wait for SIGTERM/SIGINT; then
    shut the application down (Ray drains each replica's requests) and return 0."""
    import signal

    import ray

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # a local cluster's proxy inherits it
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(args, replicas=replicas, autoscale=autoscale, num_cpus=num_cpus, num_gpus=num_gpus,
                    drain_timeout_s=drain_timeout_s), name=name, route_prefix="/")
    print(f"fastdiff serve: Ray Serve application {name!r} on http://{host}:{port}", flush=True)
    while not stop.wait(1):  # a timed wait: the signal handler runs between waits
        pass
    serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    return 0
