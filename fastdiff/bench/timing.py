"""Timing helpers shared by the benchmark tables: warm up, then the median of repeated runs."""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, *, device: str = "cpu", warmup: int = 2, repeats: int = 7, budget_s: float = 10.0) -> float:
    """Median wall time of fn() in milliseconds. Stops early (keeping >= 3 runs) past budget_s."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        start = time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 3 and time.perf_counter() - start > budget_s:
                break
    return statistics.median(times)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
