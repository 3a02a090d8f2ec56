"""Engine table: edits per minute and p50/p95 latency at concurrency 1, 2, 4, 8, beside the same edits run one by one.

The same N edit requests (random images at the model's size, one instruction, seeds 0..N-1, the
model's steps and sampler) run first one by one through pipe.edit, then through a fresh
fastdiff.Engine at each concurrency c: c client threads each submit a request and wait for it
(closed loop) until all N are done. Latency is submit -> image (queueing included); edits/min is
N over the wall time of the run. The table also gives the UNet calls and mean rows per call
(each guided edit is 3 rows), and the largest pixel difference between an engine image and the
one-by-one image of the same request (batching must not change results). The one-by-one run is
repeated at the end: if its two rows disagree, the machine's load changed during the run.

The default model is the embedded small editor (--size small: 128x128, UNTRAINED weights, so the
images are noise; the timing is what counts); --size mobilediffusion is its full-size sibling
(512x512), --model DIR a diffusers InstructPix2Pix folder.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

from fastdiff.bench.timing import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["small", "mobilediffusion"], default="small",
                        help="embedded default editor: small (128 px) or mobilediffusion (512 px)")
    parser.add_argument("--model", metavar="DIR", help="a diffusers InstructPix2Pix folder instead of the embedded editor")
    parser.add_argument("--requests", type=int, default=16, help="edits per run (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per edit (default: the model's)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client threads per engine run, comma-separated")
    parser.add_argument("--max-batch", type=int, default=8, help="Engine max_batch (requests denoised together)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="Engine max_wait_ms")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def _requests(pipe, count: int, steps):
    side = pipe.defaults.size
    rng = np.random.default_rng(0)
    return [dict(image=rng.random((side, side, 3)), instruction="make it snowy", seed=i, steps=steps, output_type="np")
            for i in range(count)]


def _count_unet_calls(pipe):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def one_by_one(pipe, requests):
    """Each request through pipe.edit, in order: (images, latencies in s, wall s, UNet rows per call)."""
    rows, handle = _count_unet_calls(pipe)
    images, latencies = [], []
    start = time.perf_counter()
    try:
        for request in requests:
            request = dict(request)
            t0 = time.perf_counter()
            images.append(pipe.edit(request.pop("image"), progress=False, **request))
            latencies.append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return images, latencies, time.perf_counter() - start, rows


def through_engine(pipe, requests, concurrency: int, max_batch: int, max_wait_ms: float):
    """The requests through a fresh Engine, from `concurrency` closed-loop client threads."""
    from fastdiff.engine import Engine

    images, latencies = [None] * len(requests), [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    errors = []
    rows, handle = _count_unet_calls(pipe)
    engine = Engine(pipe, max_batch=max_batch, max_wait_ms=max_wait_ms)

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            request = dict(requests[i])
            t0 = time.perf_counter()
            try:
                images[i] = engine.submit_edit(request.pop("image"), **request).result()
            except Exception as exc:  # reported below; the table would be meaningless
                errors.append(exc)
                return
            latencies[i] = time.perf_counter() - t0

    start = time.perf_counter()
    try:
        clients = [threading.Thread(target=client) for _ in range(concurrency)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        engine.close()
        handle.remove()
    if errors:
        raise RuntimeError(f"engine run at concurrency {concurrency} failed: {errors[0]!r}") from errors[0]
    return images, latencies, wall, rows


def _row(mode, concurrency, latencies, wall, rows, baseline_rate, diff):
    rate = 60 * len(latencies) / wall
    return dict(mode=mode, concurrency=concurrency, requests=len(latencies), edits_per_min=rate,
                p50_s=_percentile(latencies, 50), p95_s=_percentile(latencies, 95), wall_s=wall, unet_calls=len(rows),
                mean_rows_per_call=float(np.mean(rows)) if rows else 0.0,
                speedup=rate / baseline_rate if baseline_rate else 1.0, max_abs_diff=diff)


def run(args) -> int:
    from fastdiff.default_model import default_pipeline
    from fastdiff.ops import selected_name
    from fastdiff.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        raise SystemExit("--concurrency: positive ints, --requests: >= 1")
    pipe = Pipeline.from_pretrained(args.model) if args.model else default_pipeline("edit", args.size)
    if not pipe.is_editor:
        raise SystemExit(f"--model: {args.model} is a text-to-image folder; the engine table times edits")
    requests = _requests(pipe, args.requests, args.steps)
    steps = args.steps or pipe.defaults.steps
    side = pipe.defaults.size
    print(f"fastdiff engine: {pipe.name}\n  {args.requests} edits of {side}x{side}, {steps} steps, "
          f"sampler {pipe.defaults.sampler or pipe.scheduler_config.get('_class_name')}, guidance "
          f"{pipe.defaults.guidance_scale}/{pipe.defaults.image_guidance_scale} (3 UNet rows per edit); "
          f"backend {selected_name('cpu')}, {torch.get_num_threads()} threads; max_batch {args.max_batch}")

    warm = dict(requests[0], steps=2)
    pipe.edit(warm.pop("image"), progress=False, **warm)  # first-call costs (allocations, kernel set-up)

    reference, latencies, wall, rows = one_by_one(pipe, requests)
    baseline = _row("pipe.edit one by one", 1, latencies, wall, rows, 0.0, 0.0)
    results = [baseline]
    for c in levels:
        images, latencies, wall, rows = through_engine(pipe, requests, c, args.max_batch, args.max_wait_ms)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(images, reference))
        results.append(_row("Engine", c, latencies, wall, rows, baseline["edits_per_min"], diff))
    # the baseline again: on a shared machine the load drifts; compare the two baseline rows before trusting ratios
    images, latencies, wall, rows = one_by_one(pipe, requests)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(images, reference))
    results.append(_row("pipe.edit one by one (again)", 1, latencies, wall, rows, baseline["edits_per_min"], diff))

    table = [[r["mode"], str(r["concurrency"]), f"{r['edits_per_min']:.1f}", f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}",
              str(r["unet_calls"]), f"{r['mean_rows_per_call']:.1f}", f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.1e}"]
             for r in results]
    print(format_table(["mode", "concurrency", "edits/min", "p50 s", "p95 s", "UNet calls", "rows/call",
                        "vs one by one", "max |diff|"], table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": pipe.name, "image_size": side, "steps": steps, "threads": torch.get_num_threads(),
                       "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "rows": results}, f, indent=2)
    return 0
