"""This machine's peak rates, measured, for the "% of peak" columns of the kernel and UNet tables.

Compute: the median GFLOP/s of torch.mm on square matrices in the dtype (oneDNN / MKL on a CPU,
cuBLAS on CUDA), at torch's current thread count: the best a dense product reaches here, not a
datasheet figure. Bandwidth: the median GB/s of copying a large tensor (bytes read + written).
Each is measured once per (dtype, device, threads) in a process and printed with how it was measured.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from fastdiff.bench.timing import median_ms

MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}
COPY_BYTES = {"cpu": 2**28, "cuda": 2**30}


@dataclasses.dataclass(frozen=True)
class Peak:
    rate: float  # in unit
    unit: str  # "GFLOP/s" or "GB/s"
    how: str  # what was measured

    def percent(self, rate: float) -> str:
        return f"{100 * rate / self.rate:.0f}%"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _compute(dtype: torch.dtype, device_type: str, threads: int) -> Peak:
    side = MATMUL_SIDE[device_type]
    a = torch.randn(side, side, device=device_type).to(dtype)
    b = torch.randn(side, side, device=device_type).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), device=device_type, warmup=1, repeats=5)
    where = f"{threads} threads" if device_type == "cpu" else torch.cuda.get_device_name()
    return Peak(2 * side**3 / ms / 1e6, "GFLOP/s", f"torch.mm {side}x{side} {_dtype_name(dtype)}, {where}, median of 5")


@functools.cache
def _bandwidth(device_type: str, threads: int) -> Peak:
    nbytes = COPY_BYTES[device_type]
    source = torch.ones(nbytes // 4, device=device_type)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device=device_type, warmup=1, repeats=5)
    where = f"{threads} threads" if device_type == "cpu" else torch.cuda.get_device_name()
    return Peak(2 * nbytes / ms / 1e6, "GB/s", f"copy of {nbytes >> 20} MiB (read + written), {where}, median of 5")


def compute_peak(dtype: torch.dtype, device="cpu") -> Peak:
    """The GFLOP/s of a large torch.mm in `dtype` on `device`, at torch's current thread count."""
    return _compute(dtype, torch.device(device).type, torch.get_num_threads())


def bandwidth_peak(device="cpu") -> Peak:
    """The GB/s of copying a large tensor on `device`, at torch's current thread count."""
    return _bandwidth(torch.device(device).type, torch.get_num_threads())
