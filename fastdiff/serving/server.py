"""The HTTP service: a FastAPI app in front of one Engine per model kind (text-to-image, editing).

    app = create_app(pipe)                      # or an Engine, or [generator, editor]
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/generate (JSON), POST /v1/edit (multipart with an `image` file, or JSON with the
image in base64), GET or HEAD /healthz (no auth), GET /metrics (Prometheus text). A response is PNG bytes,
or JSON {"image": base64 PNG, "seed", "width", "height"} when the request's `response_format` is
"json" or its Accept header asks for application/json (and not image/png).

Every HTTP request goes through the engine, so concurrent requests share UNet calls step by step
and each gets the image `pipe.generate/edit` gives alone with the same seed. Errors are JSON
{"error": message, "field": name}, the message starting with the field's name as fastdiff's own
PipelineErrors do; nothing else (no traceback) is ever sent: 400 unreadable body, 401 missing or
wrong API key, 404 no model for the route, 413 body too large, 422 a bad field (types, pixel and
step limits, garbage or bomb images), 429 queue full (with Retry-After), 500 the model failed
(details in the server log), 503 shutting down.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import secrets
import signal
import threading
import time
import typing

import uvicorn
from PIL import Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fastdiff.engine import Engine, EngineClosed
from fastdiff.images import load_image
from fastdiff.pipeline import Pipeline
from fastdiff.requests import ALIASES, EDIT_ALIASES, EditRequest, GenerateRequest, PipelineError, build_request

log = logging.getLogger("fastdiff.serving")

API_KEY_ENV = "FASTDIFF_API_KEY"
# PIL formats accepted for uploads: the common ones; fewer decoders exposed to untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

# One PNG per HTTP request: these request fields are the server's to set, not the client's.
_SERVER_SET = {"num_images", "output_type"}


def _http_fields(request_class, aliases: dict) -> dict[str, type]:
    """The fields of `request_class` an HTTP client may set, with the JSON type each takes: those of
    type int, float or str (tensors, generators and callbacks stay in-process; a field that also
    takes a list, as prompt, takes one string here: one image per request), under their own
    names and diffusers' aliases."""
    fields = {}
    for name, hint in typing.get_type_hints(request_class).items():
        scalar = [t for t in typing.get_args(hint) or (hint,) if t in (int, float, str)]
        if len(scalar) == 1 and name not in _SERVER_SET:
            fields[name] = scalar[0]
    fields.update({alias: fields[name] for alias, name in aliases.items() if name in fields})
    return fields


# the uploaded image: a multipart file, or base64 text in JSON
FIELDS = {"generate": _http_fields(GenerateRequest, ALIASES),
          "edit": {**_http_fields(EditRequest, {**ALIASES, **EDIT_ALIASES}), "image": str}}
RESPONSE_FORMATS = ("png", "json")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything over is refused before it reaches a model.

    max_body_bytes: request body (413). max_steps: denoising steps (422). max_pixels: output (and
    edit input) pixels, default the pipeline's (422). max_queue: requests waiting per model beyond
    the engine's running batch (429, with Retry-After: retry_after_s).
    """

    max_body_bytes: int = 16 * 1024 * 1024  # a 4-megapixel PNG in base64 fits
    max_steps: int = 150  # InstructPix2Pix/MGIE's default is 100
    max_pixels: int | None = None
    max_queue: int = 64
    retry_after_s: int = 1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name == "max_pixels":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field.name == "max_queue" else 1):
                raise ValueError(f"{field.name}: expected a positive integer, got {value!r}")


class _Refused(Exception):
    """A request answered with an error status: status, field, message (and extra headers)."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


class _Cancelled(Exception):
    """Raised in the engine's worker at a step boundary for a request whose client went away."""


def _error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> an RGB image (fastdiff.images.load_image: size checked from the header,
    decompression bombs refused, 16-bit images scaled)."""
    return load_image(data, max_pixels=max_pixels, formats=IMAGE_FORMATS)


class _Metrics:
    """Prometheus series of one app (its own registry, so several apps in a process do not clash)."""

    def __init__(self, engines: dict[str, Engine]):
        self.registry = CollectorRegistry()
        queue = Gauge("fastdiff_queue_depth", "Requests queued in the engine, not yet running", ["model"],
                      registry=self.registry)
        running = Gauge("fastdiff_running_batch_size", "Requests denoised together at the last step", ["model"],
                        registry=self.registry)
        self.unet = Histogram("fastdiff_unet_step_seconds", "Duration of one batched UNet call", ["model"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                              registry=self.registry)
        self.requests = Counter("fastdiff_requests", "HTTP requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=self.registry)
        self._hooks = []
        for kind, engine in engines.items():
            queue.labels(kind).set_function(lambda e=engine: e.queued)
            running.labels(kind).set_function(lambda e=engine: e.running)
            self._time_unet(kind, engine.pipe.unet)

    def _time_unet(self, kind: str, unet) -> None:
        started = threading.local()  # the engine's worker calls the UNet; other threads may too
        histogram = self.unet.labels(kind)

        def before(module, args):
            started.t = time.perf_counter()

        def after(module, args, output):
            histogram.observe(time.perf_counter() - started.t)

        self._hooks += [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class Service:
    """The app's state: its engines, limits, key, metrics and in-flight counts."""

    def __init__(self, engines: dict[str, Engine], owned: list[Engine], limits: Limits, api_key: str | None):
        self.engines, self.owned, self.limits = engines, owned, limits
        self.api_key = api_key.encode() if api_key else None
        self.metrics = _Metrics(engines)
        self.inflight = {kind: 0 for kind in engines}
        self.draining = False

    def start_draining(self) -> None:
        """Refuse new requests (503) while the in-flight ones finish; /healthz turns 503."""
        self.draining = True

    def close(self) -> None:
        self.draining = True
        for engine in self.owned:
            engine.close(cancel_queued=True, cancel_running=True)
        self.metrics.close()

    def healthy(self) -> bool:
        return not self.draining and all(engine.healthy for engine in self.engines.values())

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key)

    # -- one request ----------------------------------------------------------------------------

    async def handle(self, kind: str, request: Request) -> Response:
        try:
            response = await self._handle(kind, request)
            self.metrics.requests.labels(kind, "ok").inc()
            return response
        except _Refused as refused:
            self.metrics.requests.labels(kind, _OUTCOMES.get(refused.status, "invalid")).inc()
            return _error(refused.status, refused.field, refused.message, refused.headers)
        except HTTPException as exc:  # the body limit, raised while the body was read
            self.metrics.requests.labels(kind, _OUTCOMES.get(exc.status_code, "invalid")).inc()
            raise
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client disconnects
            self.metrics.requests.labels(kind, "cancelled").inc()
            raise

    async def _handle(self, kind: str, request: Request) -> Response:
        if self.draining:
            raise _Refused(503, "server", "server: shutting down; retry on another instance",
                           {"Retry-After": str(self.limits.retry_after_s)})
        engine = self.engines.get(kind)
        if engine is None:
            other = "generate" if kind == "edit" else "edit"
            raise _Refused(404, "model", f"model: this server's model cannot {kind}; use POST /v1/{other}")
        fields, upload = await _read_fields(kind, request)
        response_format = _response_format(fields.pop("response_format", None), request.headers.get("accept", ""))
        capacity = engine.max_batch + self.limits.max_queue
        if self.inflight[kind] >= capacity:
            raise _Refused(429, "queue", f"queue: {self.inflight[kind]} requests in flight, the limit of this "
                           f"server ({capacity}); retry later", {"Retry-After": str(self.limits.retry_after_s)})
        self.inflight[kind] += 1
        cancelled = threading.Event()
        try:
            future, seed = await run_in_threadpool(self._submit, kind, engine, fields, upload, cancelled)
            try:
                image = await _wait(future, request, cancelled)
            finally:
                if not future.done():  # the client went away, or this task was cancelled (Ray does that)
                    cancelled.set()
                    future.cancel()
            return await run_in_threadpool(_respond, image, seed, response_format)
        finally:
            self.inflight[kind] -= 1

    def _submit(self, kind: str, engine: Engine, fields: dict, upload: bytes | None, cancelled: threading.Event):
        """Build the request (decoding an upload) and queue it: (future, seed). Runs in a worker thread."""
        # the server's limit holds for engines passed in too (theirs may be looser)
        max_pixels = engine.max_pixels if self.limits.max_pixels is None else min(engine.max_pixels, self.limits.max_pixels)
        try:
            if kind == "edit":
                fields["image"] = decode_image(upload if upload is not None else _base64(fields.get("image")), max_pixels)
            request_class = GenerateRequest if kind == "generate" else EditRequest

            def stop_if_cancelled(pipe, index, timestep, tensors):  # runs in the engine, after each step
                if cancelled.is_set():
                    raise _Cancelled

            request = build_request(request_class, **fields, callback_on_step_end=stop_if_cancelled)
            if request.steps is not None and request.steps > self.limits.max_steps:
                raise PipelineError("steps", f"expected at most {self.limits.max_steps} (this server's limit), "
                                    f"got {request.steps}")
            future = engine.submit(engine.pipe.resolve(request, max_pixels=max_pixels))
        except PipelineError as error:
            raise _Refused(422, error.field, str(error)) from None
        except EngineClosed:
            raise _Refused(503, "server", "server: shutting down; retry on another instance") from None
        return future, request.seed  # the seed is reported to the client with its image


_OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "invalid", 413: "too_large", 422: "invalid",
             429: "rejected_busy", 499: "cancelled", 500: "failed", 503: "unavailable"}


def _endpoint(path: str) -> str:
    """A fixed metrics label per route (raw paths would let clients grow the label set)."""
    return {"/v1/generate": "generate", "/v1/edit": "edit"}.get(path, "other")


def _base64(value) -> bytes:
    if value is None:
        raise PipelineError("image", "required (a multipart file, or base64 in JSON)")
    if not isinstance(value, str):
        raise PipelineError("image", f"expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PipelineError("image", "not valid base64") from None


async def _read_fields(kind: str, request: Request) -> tuple[dict, bytes | None]:
    """The request's fields (JSON object or multipart form) and, for a multipart edit, the uploaded image."""
    content_type = request.headers.get("content-type", "")
    upload = None
    if content_type.startswith("multipart/form-data"):
        if kind != "edit":
            raise _Refused(400, "body", "body: POST /v1/generate takes JSON (Content-Type: application/json)")
        try:
            form = await request.form(max_files=1, max_fields=len(FIELDS[kind]) + 1)
        except HTTPException as exc:
            if exc.status_code == 413:
                raise
            raise _Refused(400, "body", f"body: unreadable multipart form ({exc.detail})") from None
        fields = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = _convert(kind, name, value)
            elif name == "image":
                upload = await value.read()
            else:
                raise _Refused(422, name, f"{name}: expected a form field, got a file")
        if upload is None:
            raise _Refused(422, "image", "image: required (the multipart file field 'image')")
    else:
        body = await request.body()
        try:
            fields = json.loads(body)
        except RecursionError:  # e.g. 100k nested '[': the decoder recurses per level
            raise _Refused(400, "body", "body: JSON nested too deeply") from None
        except ValueError as exc:  # malformed JSON, bad UTF-8, integers over Python's 4300-digit limit
            raise _Refused(400, "body", f"body: not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise _Refused(400, "body", f"body: expected a JSON object, got {type(fields).__name__}")
    allowed = set(FIELDS[kind]) | {"response_format"}
    for name in fields:
        if name not in allowed:
            raise _Refused(422, name, f"{name}: not a field of POST /v1/{kind} (expected one of {sorted(allowed)})")
        text = name != "image" and FIELDS[kind].get(name) is str  # the image: _base64 says what it expects
        if text and fields[name] is not None and not isinstance(fields[name], str):
            raise _Refused(422, name, f"{name}: expected a string (one image per request: send a request per "
                                      f"prompt), got {type(fields[name]).__name__}")
    required = ["prompt"] if kind == "generate" else ["image", "instruction"]
    for name in required:
        if fields.get(name) is None and not (name == "image" and upload is not None) \
                and not (name == "instruction" and fields.get("prompt") is not None):
            raise _Refused(422, name, f"{name}: required")
    return {name: value for name, value in fields.items() if value is not None}, upload


def _convert(kind: str, name: str, value: str):
    """A multipart text value -> the type its field takes."""
    to = FIELDS[kind].get(name, str)
    try:
        return to(value)
    except ValueError:
        raise _Refused(422, name, f"{name}: expected {'an integer' if to is int else 'a number'}, "
                                  f"got {value[:40]!r}") from None


def _response_format(field, accept: str) -> str:
    if field is not None:
        if field not in RESPONSE_FORMATS:
            raise _Refused(422, "response_format", f"response_format: expected one of {RESPONSE_FORMATS}, got {field!r}")
        return field
    return "json" if "application/json" in accept and "image/png" not in accept else "png"


async def _wait(future, request: Request, cancelled: threading.Event):
    """The future's image; a client that disconnects first cancels it. Engine failures become
    _Refused (the traceback goes to the log, never to the client)."""
    disconnected = asyncio.ensure_future(_disconnect(request))
    result = asyncio.wrap_future(future)
    try:
        await asyncio.wait({disconnected, result}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not result.done():
        cancelled.set()
        future.cancel()
        # the engine still ends it (with _Cancelled at the next step): retrieve that here, or asyncio
        # logs "Future exception was never retrieved" for every disconnect
        result.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise _Refused(499, "client", "client: disconnected")  # nobody reads it; counted as an outcome
    try:
        return result.result()
    except PipelineError as error:  # failed while preparing (e.g. conditioning shapes): the request's fault
        raise _Refused(422, error.field, str(error)) from None
    except (EngineClosed, asyncio.CancelledError):
        raise _Refused(503, "server", "server: shutting down before this request finished") from None
    except Exception:
        log.exception("request failed in the engine")
        raise _Refused(500, "model", "model: the model failed on this request (see the server log)") from None


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _respond(image: Image.Image, seed: int, response_format: str) -> Response:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    headers = {"X-Fastdiff-Seed": str(seed)}
    if response_format == "png":
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)
    return JSONResponse({"image": base64.b64encode(buffer.getvalue()).decode(), "format": "png", "seed": seed,
                         "width": image.width, "height": image.height}, headers=headers)


class _Guard:
    """ASGI middleware: the API key (every path but /healthz) and the body-size limit, checked
    before the body is read; a body that streams past the limit is cut off with 413."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if service.api_key is not None and scope["path"] != "/healthz" and not service.authorized(headers.get("authorization")):
            service.metrics.requests.labels(_endpoint(scope["path"]), "unauthorized").inc()
            response = _error(401, "authorization", "authorization: expected the header 'Authorization: Bearer <API key>' "
                              "with this server's key", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        limit = service.limits.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            service.metrics.requests.labels(_endpoint(scope["path"]), "too_large").inc()
            response = _error(413, "body", f"body: {int(length):,} bytes, over the limit of {limit:,} (max_body_bytes)")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # chunked or lying Content-Length
                raise HTTPException(413, f"body: over the limit of {limit:,} bytes (max_body_bytes)")
            return message

        await self.app(scope, counted_receive, send)


def _engines(pipe_or_engine, max_batch: int, max_wait_ms: float, max_pixels: int | None):
    """{"generate": Engine, "edit": Engine} from one or several Pipelines/Engines, and those made here."""
    items = pipe_or_engine if isinstance(pipe_or_engine, (list, tuple)) else [pipe_or_engine]
    engines, owned = {}, []
    for item in items:
        if isinstance(item, Pipeline):
            item = Engine(item, max_batch=max_batch, max_wait_ms=max_wait_ms, max_pixels=max_pixels)
            owned.append(item)
        elif not isinstance(item, Engine):
            raise TypeError(f"pipe_or_engine: expected a Pipeline, an Engine or a list of them, got {type(item).__name__}")
        kind = "edit" if item.pipe.is_editor else "generate"
        if kind in engines:
            raise ValueError(f"pipe_or_engine: two {kind} models; give at most one text-to-image and one editing model")
        engines[kind] = item
    if not engines:
        raise ValueError("pipe_or_engine: expected at least one Pipeline or Engine")
    return engines, owned


def create_app(pipe_or_engine, *, api_key: str | None = None, limits: Limits | None = None, max_batch: int = 8,
               max_wait_ms: float = 10.0) -> FastAPI:
    """A FastAPI app serving `pipe_or_engine`: a Pipeline, an Engine, or a list of them (at most
    one text-to-image model for /v1/generate and one editor for /v1/edit). Pipelines get an Engine
    (max_batch, max_wait_ms) owned by the app, closed when the app shuts down; engines passed in
    stay the caller's. api_key: required as 'Authorization: Bearer KEY' on every route but
    /healthz (default: $FASTDIFF_API_KEY; none: open). The Service is app.state.service."""
    limits = limits or Limits()
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    engines, owned = _engines(pipe_or_engine, max_batch, max_wait_ms, limits.max_pixels)
    service = Service(engines, owned, limits, api_key)

    async def lifespan(app):
        yield
        service.close()

    # no /docs or /openapi.json: the routes take hand-checked bodies, described in this module
    app = FastAPI(title="fastdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(_Guard, service=service)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        field = "body" if exc.status_code == 413 else "path"  # 413: _Guard's body limit
        return _error(exc.status_code, field, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # logged by Starlette; the client gets no details
        return _error(500, "server", "server: internal error (see the server log)")

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await service.handle("generate", request)

    @app.post("/v1/edit")
    async def edit(request: Request):
        return await service.handle("edit", request)

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: load balancers' probes
    async def healthz():
        status = 200 if service.healthy() else 503
        return JSONResponse({"status": "ok" if status == 200 else "unavailable",
                             "models": {kind: engine.pipe.name for kind, engine in engines.items()},
                             "quantized": {kind: engine.pipe.quantized for kind, engine in engines.items()}}, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def load_pipelines(model, dtype=None, quantize=None) -> list[Pipeline]:
    """The pipelines to serve for `model` (as fastdiff.api.get_pipeline: a diffusers folder, one
    model; an embedded default name or None, its text-to-image model and its editor), their UNets
    quantized to `quantize` ("int8") when given."""
    from fastdiff.api import get_pipeline

    generator, editor = get_pipeline(model, "generate", dtype, quantize), get_pipeline(model, "edit", dtype, quantize)
    return [generator] if editor is generator else [generator, editor]


class _Server(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM/SIGINT: the socket stays open, /healthz and
    new requests answer 503 (a load balancer sees it and routes away) while the requests in flight
    finish, for up to drain_timeout_s; then uvicorn shuts down. A second signal stops at once.
    (uvicorn alone closes the socket at the signal, so nobody could read the 503.)"""

    def __init__(self, config, service: Service, drain_timeout_s: float):
        super().__init__(config)
        self.service, self.drain_timeout_s = service, drain_timeout_s
        self._drain = None  # (deadline, signal, frame) from the first signal

    def handle_exit(self, sig, frame):
        if self._drain is None:
            self.service.start_draining()
            self._drain = (time.monotonic() + self.drain_timeout_s, sig, frame)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None and not self.should_exit:
            deadline, sig, frame = self._drain
            if not any(self.service.inflight.values()) or time.monotonic() > deadline:
                super().handle_exit(sig, frame)
        return await super().on_tick(counter)


def serve_forever(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 30.0,
                  log_level: str = "info") -> int:
    """Run `app` (from create_app) until SIGTERM or SIGINT: then answer 503 to new requests and
    /healthz while the in-flight ones finish, for up to drain_timeout_s (the rest are cancelled),
    close the engines; 0."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout_s,
                            log_level=log_level, lifespan="on")
    server = _Server(config, app.state.service, drain_timeout_s)
    # uvicorn re-raises the signal once it has shut down; a no-op handler makes SIGTERM a clean exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
