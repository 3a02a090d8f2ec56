"""The batching engine: edits and generations share UNet calls, joining and leaving step by step.

    with fastdiff.Engine(pipe, max_batch=8) as engine:
        futures = [engine.submit_edit(image, "make it snowy", seed=i) for i in range(8)]
        images = [f.result() for f in futures]

One worker thread owns the models. Before every denoising step it admits queued requests (up to
max_batch running at once), then advances all running jobs by one step: the guidance branches
of every request (3 per guided edit, 2 per guided generation, 1 unguided) go into one UNet call
with per-row timesteps (one call per latent size / context length when requests differ), and
each request applies its own guidance and takes its own sampler step with its own generator, so
requests with different step counts, samplers, scales and seeds share calls and each gets the
image it would get alone. A request that arrives mid-way starts at the next step; one that
finishes is decoded and leaves.

Bad requests are refused at submit (PipelineError, raised to the caller) by the same checks as
Pipeline.generate/edit, so nothing expensive is queued for them. Failures after that stay with
their request: encoding errors fail that request's future when it is prepared; a UNet call that
raises is retried request by request, so only the request that makes it fail gets the exception.

An engine still busy when the interpreter exits is closed then: its queued requests are
cancelled, its running ones abandoned at the next step boundary, so the process exits cleanly.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future

from fastdiff import ops
from fastdiff.jobs import group_jobs, predict
from fastdiff.pipeline import Resolved
from fastdiff.requests import EditRequest, GenerateRequest, PipelineError, Request, build_request, max_pixels_limit

_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """A worker thread still inside a kernel when the interpreter tears down aborts the process
    (std::terminate): stop every engine first, dropping its work."""
    for engine in list(_live_engines):
        engine.close(cancel_queued=True, cancel_running=True)


class EngineClosed(RuntimeError):
    """submit_* called after close(), or a request dropped by close(cancel_running=True)."""


class _Running:
    """A prepared request being denoised."""

    def __init__(self, future: Future, prepared):
        self.future, self.prepared = future, prepared

    def active_jobs(self):
        return [job for job in self.prepared.jobs if not job.done]


class Engine:
    def __init__(self, pipe, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_pixels: int | None = None):
        """pipe: a fastdiff.Pipeline. max_batch: requests denoised together at most.
        max_wait_ms: when idle, how long the first request waits for company before starting.
        max_pixels: the largest request accepted (default: the pipeline's max_pixels).
        The backend forced in the creating thread (ops.use_backend) is used by the worker too."""
        if not all(hasattr(pipe, attribute) for attribute in ("prepare", "resolve", "max_pixels")):
            raise TypeError(f"pipe: expected a fastdiff.Pipeline, got {type(pipe).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive int, got {max_batch!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms: expected a number >= 0, got {max_wait_ms!r}")
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_pixels = pipe.max_pixels if max_pixels is None else max_pixels_limit(max_pixels)
        self._backend = ops.forced_backend()
        self._queue: deque[tuple[Future, Resolved]] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._cancel_queued = False
        self._cancel_running = False
        self._running_count = 0
        self._worker = threading.Thread(target=self._serve, name="fastdiff-engine", daemon=True)
        self._worker.start()
        _live_engines.add(self)

    # -- public API ---------------------------------------------------------------------------

    def submit(self, request: Request | Resolved, *, max_pixels: int | None = None) -> Future:
        """Queue a GenerateRequest (num_images must be 1) or an EditRequest, resolved here, or what
        this engine's pipe.resolve returned for one (a caller that resolved it already: MGIE, the
        server). Raises PipelineError at once for a request the pipeline would refuse; the Future
        gives the PIL image (or array for output_type='np'). max_pixels: a tighter limit for this
        request; the engine's own still holds when it is smaller."""
        if not isinstance(request, (GenerateRequest, EditRequest, Resolved)):
            raise TypeError(f"request: expected a GenerateRequest, an EditRequest or a Resolved, got {type(request).__name__}")
        if isinstance(request, Resolved) and request.pipe is not self.pipe:
            raise TypeError("request: resolved by another pipeline than this engine's")
        total = (request.request if isinstance(request, Resolved) else request).total_images
        if total != 1:
            raise PipelineError("num_images", f"the engine takes one image per request (got {total}); "
                                "submit several requests")
        limit = self.max_pixels if max_pixels is None else min(self.max_pixels, max_pixels_limit(max_pixels))
        if isinstance(request, Resolved):
            resolved = request
            if resolved.pixels > limit:
                name = "image" if isinstance(resolved.request, EditRequest) else "height, width"
                raise PipelineError(name, f"{resolved.pixels:,} pixels, over the limit of {limit:,} (max_pixels)")
        else:
            resolved = self.pipe.resolve(request, max_pixels=limit)
        future: Future = Future()
        with self._wakeup:
            if self._closing:
                raise EngineClosed("engine: submit after close()")
            self._queue.append((future, resolved))
            self._wakeup.notify_all()
        return future

    def submit_generate(self, prompt=None, **options) -> Future:
        """submit(GenerateRequest(prompt=prompt, **options)): options as Pipeline.generate."""
        return self.submit(build_request(GenerateRequest, prompt=prompt, **options))

    def submit_edit(self, image, instruction=None, **options) -> Future:
        """submit(EditRequest(image=image, instruction=instruction, **options)): options as Pipeline.edit."""
        return self.submit(build_request(EditRequest, image=image, instruction=instruction, **options))

    @property
    def queued(self) -> int:
        """Requests waiting to start (a metrics reading: it may change at once)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests being denoised at the last step boundary (a metrics reading)."""
        return self._running_count

    @property
    def healthy(self) -> bool:
        """The worker is alive and the engine takes requests (for health checks)."""
        return self._worker.is_alive() and not self._closing

    def close(self, *, cancel_queued: bool = False, cancel_running: bool = False) -> None:
        """Stop taking requests; finish the running ones and, unless cancel_queued, the queued ones
        (cancel_queued: their futures are cancelled; cancel_running: the running ones stop at the
        next step boundary, their futures failing with EngineClosed); then join the worker. Safe
        to call twice."""
        with self._wakeup:
            self._closing = True
            self._cancel_queued = self._cancel_queued or cancel_queued or cancel_running
            self._cancel_running = self._cancel_running or cancel_running
            self._wakeup.notify_all()
        if threading.current_thread() is not self._worker:  # a future's callback may call close()
            self._worker.join()
        _live_engines.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(cancel_queued=exc[0] is not None)

    # -- worker -------------------------------------------------------------------------------

    def _take_queued(self, slots: int, idle: bool) -> list:
        """Up to `slots` queued requests; blocks while idle and nothing is queued."""
        with self._wakeup:
            while idle and not self._queue and not self._closing:
                self._wakeup.wait()
            if idle and self._queue and self.max_wait_s and len(self._queue) < slots and not self._closing:
                deadline = time.monotonic() + self.max_wait_s  # let a burst of requests start together
                while len(self._queue) < slots and (left := deadline - time.monotonic()) > 0 and not self._closing:
                    self._wakeup.wait(left)
            if self._closing and self._cancel_queued:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            taken = []
            while self._queue and len(taken) < slots:
                taken.append(self._queue.popleft())
            return taken

    def _prepare(self, future, request: Resolved):
        """A _Running for a queued request, or None when it was cancelled or cannot be prepared."""
        if not future.set_running_or_notify_cancel():
            return None  # cancelled by its owner while queued
        try:
            prepared = self.pipe.prepare(request)
        except Exception as exc:
            future.set_exception(exc)
            return None
        return _Running(future, prepared)

    def _step(self, running: list[_Running]) -> list[_Running]:
        """One denoising step of every running request; returns those that have not failed."""
        failed: dict[_Running, BaseException] = {}
        owner = {job: item for item in running for job in item.active_jobs()}
        for group in group_jobs(list(owner)):
            members = list(dict.fromkeys(owner[job] for job in group))
            rows_of = {}
            try:
                rows_of.update(zip(group, predict(self.pipe.unet, group)))
            except Exception as exc:
                if len(members) == 1:
                    failed[members[0]] = exc
                    continue
                # find the culprit: each request alone (nothing was advanced, so the retry is exact)
                for item in members:
                    jobs = [job for job in group if owner[job] is item]
                    try:
                        rows_of.update(zip(jobs, predict(self.pipe.unet, jobs)))
                    except Exception as alone_exc:
                        failed[item] = alone_exc
            for job in group:
                if owner[job] in failed:
                    continue
                try:
                    job.advance(rows_of[job])
                except Exception as exc:
                    failed[owner[job]] = exc
        for item in dict.fromkeys(owner.values()):
            if item not in failed:
                try:
                    item.prepared.step_end()
                except Exception as exc:  # the request's own callback
                    failed[item] = exc
        for item, exc in failed.items():
            item.future.set_exception(exc)
        return [item for item in running if item not in failed]

    def _finish(self, running: list[_Running]) -> list[_Running]:
        """Decode and resolve the requests whose jobs are all done; returns the others."""
        still_running = []
        for item in running:
            if item.active_jobs():
                still_running.append(item)
                continue
            try:
                item.future.set_result(item.prepared.finish()[0])
            except Exception as exc:
                item.future.set_exception(exc)
        return still_running

    def _serve(self) -> None:
        running: list[_Running] = []
        try:
            if self._backend is not None:
                with ops.use_backend(self._backend):
                    self._loop(running)
            else:
                self._loop(running)
        except BaseException as exc:  # a bug in the loop itself: fail everything rather than hang callers
            with self._wakeup:
                self._closing = True
                pending = [item.future for item in running] + [entry[0] for entry in self._queue]
                self._queue.clear()
            for future in pending:
                if not future.done():
                    if future.running() or future.set_running_or_notify_cancel():
                        future.set_exception(RuntimeError(f"engine: worker failed ({type(exc).__name__}: {exc})"))
            raise

    def _loop(self, running: list[_Running]) -> None:
        while True:
            for future, request in self._take_queued(self.max_batch - len(running), idle=not running):
                item = self._prepare(future, request)
                if item is not None:
                    running.append(item)
            if self._cancel_running:
                for item in running:
                    item.future.set_exception(EngineClosed("engine: closed before this request finished"))
                running.clear()
            self._running_count = len(running)
            if not running:
                with self._wakeup:
                    if self._closing and not self._queue:
                        return
                continue
            running[:] = self._finish(self._step(running))
            self._running_count = len(running)
