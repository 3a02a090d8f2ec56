"""Serving table: requests/min, p50/p95 over HTTP (one process; Ray, 1 and 2 replicas) beside pipe.generate.

The same N generate requests (one prompt, seeds 0..N-1, the model's size and steps) run first
one by one through pipe.generate in this process, then through each server from c closed-loop
client threads (each sends a request, waits for the PNG, sends the next) until all N are
answered. Latency is send -> PNG received (HTTP, queueing, PNG encoding included); requests/min
is N over the run's wall time. Every server runs 1 torch thread per process (per replica on
Ray); Ray runs a local 2-CPU cluster, 1 CPU per replica. "max |diff|" is the largest difference,
in 8-bit levels, between a served image and pipe.generate's for the same seed.

The model is the embedded small MobileDiffusion (--size small: 128x128, 1 step, UNTRAINED), so
the table measures the serving stack's own cost; needs the serve extra (pip install 'fastdiff[serve]').
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from fastdiff.bench.timing import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["small", "mobilediffusion"], default="small",
                        help="embedded default model: small (128 px) or mobilediffusion (512 px)")
    parser.add_argument("--requests", type=int, default=48, help="requests per run (default 48)")
    parser.add_argument("--concurrency", default="1,4,16", help="client threads per run, comma-separated")
    parser.add_argument("--max-batch", type=int, default=16, help="Engine max_batch in each server")
    parser.add_argument("--replicas", default="1,2", help="Ray replica counts to run, comma-separated ('' for none)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    """Returns once GET {url}/healthz answers 200. TimeoutError after timeout_s; RuntimeError as soon
    as `proc`, the server's process if given, exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def _through_http(url: str, bodies: list[dict], concurrency: int):
    """The requests from `concurrency` closed-loop client threads: (PNG arrays, latencies, wall s)."""
    import httpx
    from PIL import Image

    images, latencies, errors = [None] * len(bodies), [None] * len(bodies), []
    next_index, lock = iter(range(len(bodies))), threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                response = http.post("/v1/generate", json=bodies[i])
                latencies[i] = time.perf_counter() - t0
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    return
                images[i] = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{url} at concurrency {concurrency}: {errors[0]}")
    return images, latencies, time.perf_counter() - start


def _row(mode, concurrency, latencies, wall, reference, images) -> dict:
    diff = max(float(np.abs(a - b).max()) for a, b in zip(images, reference))
    return dict(mode=mode, concurrency=concurrency, requests=len(latencies), requests_per_min=60 * len(latencies) / wall,
                p50_s=float(np.percentile(latencies, 50)), p95_s=float(np.percentile(latencies, 95)), wall_s=wall,
                max_abs_diff_levels=diff)


def run(args) -> int:
    from fastdiff.default_model import default_pipeline

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    replica_counts = [int(r) for r in args.replicas.split(",") if r.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        raise SystemExit("--concurrency: positive ints, --requests: >= 1")
    torch.set_num_threads(1)
    pipe = default_pipeline("generate", args.size)
    side = pipe.defaults.size
    bodies = [{"prompt": "a lighthouse on a cliff", "seed": i} for i in range(args.requests)]
    print(f"fastdiff serve bench: {pipe.name}\n  {args.requests} generate requests of {side}x{side}, "
          f"{pipe.defaults.steps} step(s); 1 torch thread per server process/replica; max_batch {args.max_batch}",
          flush=True)

    pipe.generate(progress=False, **bodies[0])  # first-call costs
    reference, latencies = [], []
    start = time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        reference.append(np.asarray(pipe.generate(progress=False, **body)[0], dtype=np.int16))
        latencies.append(time.perf_counter() - t0)
    rows = [_row("pipe.generate direct", 1, latencies, time.perf_counter() - start, reference, reference)]

    def measure(mode, url):
        _through_http(url, bodies[:2], 1)  # warm the server
        for c in levels:
            images, latencies, wall = _through_http(url, bodies, c)
            rows.append(_row(mode, c, latencies, wall, reference, images))
            print(f"  {mode} c={c}: {rows[-1]['requests_per_min']:.0f}/min", flush=True)

    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "fastdiff"), "serve", "--model", args.size, "--threads",
               "1", "--port", str(port), "--max-batch", str(args.max_batch)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        measure("one process (uvicorn)", f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(60)

    if replica_counts:
        import ray
        from ray import serve

        from fastdiff.serving.ray_serve import ServeArgs, build

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for count in replica_counts:
                serve.run(build(ServeArgs(model=args.size, threads=1, max_batch=args.max_batch), replicas=count,
                                num_cpus=1), name="bench", route_prefix="/")
                wait_healthy(f"http://127.0.0.1:{port}")
                measure(f"Ray Serve, {count} replica{'s' if count > 1 else ''}", f"http://127.0.0.1:{port}")
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()

    base = rows[0]["requests_per_min"]
    table = [[r["mode"], str(r["concurrency"]), f"{r['requests_per_min']:.0f}", f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}",
              f"{r['requests_per_min'] / base:.2f}x", f"{r['max_abs_diff_levels']:.0f}"] for r in rows]
    print(format_table(["mode", "concurrency", "requests/min", "p50 s", "p95 s", "vs direct", "max |diff|"], table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": pipe.name, "image_size": side, "max_batch": args.max_batch, "rows": rows}, f, indent=2)
    return 0
