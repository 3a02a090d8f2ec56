"""The batching engine: edits and generations share UNet calls, joining and leaving step by step.

    with fastdiff.Engine(pipe, max_batch=8) as engine:
        futures = [engine.submit_edit(image, "make it snowy", seed=i) for i in range(8)]
        images = [f.result() for f in futures]

One worker thread owns the models. At every denoising step it admits queued requests (up to
max_batch running at once), then advances all running jobs by one step with `step_jobs`: the
guidance branches of every request (3 per edit, 2 per guided generation, 1 unguided) go into one
UNet call with per-row timesteps, and each request applies its own guidance and takes its own
sampler step, with its own generator. A request that arrives mid-way starts at the next step;
one that finishes is decoded and leaves. A request whose preparation fails (bad image, bad
number) fails its own future; the others go on.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future

from fastdiff.jobs import step_jobs


class EngineClosed(RuntimeError):
    """submit_* called after close()."""


class Engine:
    def __init__(self, pipe, *, max_batch: int = 8, max_wait_ms: float = 10.0):
        """pipe: a fastdiff.Pipeline. max_batch: requests denoised together at most.
        max_wait_ms: when idle, how long the first request waits for company before starting."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive int, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms: expected a number >= 0, got {max_wait_ms!r}")
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: deque[tuple[Future, str, tuple, dict]] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._cancel_queued = False
        self._worker = threading.Thread(target=self._serve, name="fastdiff-engine", daemon=True)
        self._worker.start()

    # -- public API ---------------------------------------------------------------------------

    def submit_generate(self, prompt=None, **kwargs) -> Future:
        """Queue pipe.generate(prompt, **kwargs) (num_images must be 1). Future -> PIL image."""
        return self._submit("generate", (prompt,), kwargs)

    def submit_edit(self, image, instruction=None, **kwargs) -> Future:
        """Queue pipe.edit(image, instruction, **kwargs). Future -> PIL image."""
        return self._submit("edit", (image, instruction), kwargs)

    def close(self, *, cancel_queued: bool = False) -> None:
        """Finish the running requests and, unless cancel_queued, the queued ones; join the worker."""
        with self._wakeup:
            self._closing = True
            self._cancel_queued = cancel_queued
            self._wakeup.notify_all()
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(cancel_queued=exc[0] is not None)

    # -- worker -------------------------------------------------------------------------------

    def _submit(self, kind, args, kwargs) -> Future:
        future: Future = Future()
        with self._wakeup:
            if self._closing:
                raise EngineClosed("engine: submit after close()")
            self._queue.append((future, kind, args, kwargs))
            self._wakeup.notify_all()
        return future

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

    def _serve(self) -> None:
        running = []  # (future, request)
        while True:
            for future, kind, args, kwargs in self._take_queued(self.max_batch - len(running), idle=not running):
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled by its owner while queued
                try:
                    prepare = self.pipe._prepare_generate if kind == "generate" else self.pipe._prepare_edit
                    request = prepare(*args, **kwargs)
                    if kind == "generate" and len(request.jobs) != 1:
                        raise ValueError("num_images: the engine takes one image per request; submit several requests")
                except Exception as exc:
                    future.set_exception(exc)
                    continue
                running.append((future, request))
            if not running:
                with self._wakeup:
                    if self._closing and not self._queue:
                        return
                continue
            try:
                step_jobs(self.pipe.unet, [job for _, request in running for job in request.jobs if not job.done])
            except Exception as exc:  # a failed UNet call fails the requests it carried, not the engine
                for future, _ in running:
                    future.set_exception(exc)
                running = []
                continue
            still_running = []
            for future, request in running:
                if all(job.done for job in request.jobs):
                    try:
                        future.set_result(request.finish()[0])
                    except Exception as exc:
                        future.set_exception(exc)
                else:
                    still_running.append((future, request))
            running = still_running
