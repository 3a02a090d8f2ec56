"""What this machine runs fast: CPU features and the dtypes with a fast path per device (a leaf).

bf16 on a CPU is fast only with BF16 dot products (AVX512_BF16 or AMX-BF16). Without them torch's
oneDNN and fastdiff's kernels convert every operand to fp32 and back: measured on an AMD EPYC
Zen 3 (AVX2 + FMA, 2 cores), an SD1.5-architecture UNet step in bf16 took 5.1x the fp32 time.
"""
from __future__ import annotations

import functools
import platform

import torch

BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_SLOWDOWN = "5.1x"  # the measurement above: what a user asking for bf16 on such a CPU gets


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fast_dtypes(device_type: str = "cpu") -> tuple[torch.dtype, ...]:
    """The dtypes with a fast path on `device_type`: fp32 always; on CUDA bf16 and fp16; on a CPU
    bf16 only with BF16 dot products."""
    if device_type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    if device_type == "cpu" and any(flag in cpu_flags() for flag in BF16_DOT_FLAGS):
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)
