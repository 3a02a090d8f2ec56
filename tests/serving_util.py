"""Helpers for the serving tests: real servers on 127.0.0.1 (a `fastdiff serve` process or uvicorn
in a thread), PNG round trips, a decompression bomb, Prometheus readings. Every wait is bounded."""
from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
from PIL import Image

from fastdiff.bench.serve import free_port, wait_healthy

STARTUP_S = 120  # a server that is not up by then fails the test instead of hanging it


@contextlib.contextmanager
def serve_process(*args: str, env: dict | None = None, while_starting=None):
    """`fastdiff serve --model small --threads 1 *args` on a free port: yields (url, process).
    while_starting: called while the server starts (its start-up is mostly imports and model building)."""
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "fastdiff"), "serve", "--model", "small", "--threads", "1",
               "--port", str(port), *args]
    log = open(os.devnull, "w")
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if while_starting is not None:
            while_starting()
        wait_healthy(url, proc, timeout_s=STARTUP_S)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


@contextlib.contextmanager
def serve_in_thread(app):
    """uvicorn serving `app` on a free port from a thread of this process: yields the URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=STARTUP_S)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def bomb_png(side: int = 30000) -> bytes:
    """A real decompression bomb: a side x side 1-bit PNG of zeros (~110 MB of pixels in ~100 KB),
    its IDAT compressed row by row so this process never holds the raw image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent, as for a counter never incremented)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match[1] == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match[3])
    return 0.0
