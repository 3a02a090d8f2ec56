"""This machine's peak rates, measured, for the "% of peak" columns of the kernel and UNet tables.

Compute on a CPU: the fp32 FMA ceiling, measured by the C++ backend's fma_peak (12 register-only
FMA chains per thread at the kernels' SIMD level, on torch's threads); bf16 on a CPU with BF16 dot
products (vdpbf16ps: two products per fp32 lane) twice that. Elsewhere (CUDA, bf16 without BF16
instructions, no C++ build) the median GFLOP/s of torch.mm on square matrices in the dtype: the
best a dense product reaches there, named as such. Bandwidth: the median GB/s of copying a large tensor (bytes read + written).
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


def _fma_peak(dtype: torch.dtype) -> Peak | None:
    """The CPU's FMA ceiling in `dtype` from the C++ backend, or None where it does not apply."""
    from fastdiff import ops

    try:
        level = ops.cpp_simd_level()
    except (ImportError, OSError, RuntimeError):  # no C++ build here: torch.mm's rate stands in
        return None
    from fastdiff.ops import cpp

    if dtype == torch.float32 and level != "scalar":
        gflops, lanes, threads = cpp.fma_peak()
        return Peak(gflops, "GFLOP/s", f"fp32 FMA peak: 12 FMA chains x {lanes} lanes per thread ({level}), {threads} threads")
    if dtype == torch.bfloat16 and level == "avx512_bf16":
        gflops, lanes, threads = cpp.fma_peak()
        return Peak(2 * gflops, "GFLOP/s", f"bf16 peak: 2 x the fp32 FMA peak {gflops:.0f} (vdpbf16ps: two products a lane), "
                                           f"{threads} threads")
    return None


@functools.cache
def _compute(dtype: torch.dtype, device_type: str, threads: int) -> Peak:
    if device_type == "cpu":
        fma = _fma_peak(dtype)
        if fma is not None:
            return fma
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
    """This machine's compute ceiling in `dtype` on `device` at torch's current thread count (see the
    module docstring for how each is measured)."""
    return _compute(dtype, torch.device(device).type, torch.get_num_threads())


def bandwidth_peak(device="cpu") -> Peak:
    """The GB/s of copying a large tensor on `device`, at torch's current thread count."""
    return _bandwidth(torch.device(device).type, torch.get_num_threads())
