"""The one timer of the benchmark tables (and of tools/gpu_check.py), and their table layout.

median_ms: warm up, then the median of timed rounds. On a CPU a round is one call's wall time;
on CUDA, CUDA events around enough back-to-back calls that a round lasts min_round_ms (a tiny
kernel's launch gaps do not dominate). interleaved_ms: several callables taking turns round by
round, so that a shared machine's changing load hits them alike. elapsed_ms: one call, synced.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def elapsed_ms(fn: Callable, *, device="cpu") -> float:
    """Wall time of one fn() call in milliseconds, the device synchronised after it."""
    start = time.perf_counter()
    fn()
    if _is_cuda(device):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn: Callable, *, device="cpu", warmup: int = 2, repeats: int = 7, budget_s: float = 10.0,
              min_round_ms: float = 1.0) -> float:
    """Median milliseconds per fn() call over `repeats` rounds after `warmup` calls (compiles,
    weight packing, cuDNN plan choice; 0 when the caller has just run fn). Stops early, keeping at
    least 3 rounds, past budget_s. min_round_ms: CUDA only (0: one call per round)."""
    cuda = _is_cuda(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        if not cuda:
            times = []
            began = time.perf_counter()
            for _ in range(repeats):
                times.append(elapsed_ms(fn))
                if len(times) >= 3 and time.perf_counter() - began > budget_s:
                    break
            return statistics.median(times)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        calls = 1
        if min_round_ms > 0:
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            calls = max(1, min(1000, math.ceil(min_round_ms / max(start.elapsed_time(stop), 1e-3))))
        times = []
        began = time.perf_counter()
        for _ in range(repeats):
            start.record()
            for _ in range(calls):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / calls)
            if len(times) >= 3 and time.perf_counter() - began > budget_s:
                break
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable], *, device="cpu", warmup: int = 1, repeats: int = 5,
                   budget_s: float = 60.0) -> dict[str, list[float]]:
    """Every fn once per round, in order, for `repeats` rounds after `warmup` rounds: {name: the
    milliseconds of each round}. Stops early, keeping at least 3 rounds, past budget_s."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        began = time.perf_counter()
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(elapsed_ms(fn, device=device))
            if len(times[name]) >= 3 and time.perf_counter() - began > budget_s:
                break
    return times


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
