"""What this machine runs, and what it runs fast: CPU features and fastdiff's one capability table
(a leaf). Every other module (the ops door, the C++ backend, the dense products, dtype resolution at
load, the CLI) reads the dtypes from here:

  DTYPE_NAMES              the names a dtype may be given by (dtype= in the API, --dtype in the CLI)
  device_dtypes(device)    what fastdiff's models run on a device type
  backend_dtypes(backend)  what each ops backend's kernels take
  fast_dtypes(device)      the subset of device_dtypes with a fast path on this machine
  onednn_dtypes()          what torch's oneDNN products run here (fastdiff.ops.linear / conv2d)

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


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}

# The C++ kernels run fp32 and bf16; fp16 only where Triton (or plain torch) runs it.
_BACKEND_DTYPES = {
    "reference": (torch.float32, torch.bfloat16, torch.float16),
    "cpp": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}
_DEVICE_BACKEND = {"cpu": "cpp", "cuda": "triton"}


def backend_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes the kernels of ops backend `backend` ("reference", "cpp", "triton") take."""
    if backend not in _BACKEND_DTYPES:
        raise ValueError(f"backend: expected one of {tuple(_BACKEND_DTYPES)}, got {backend!r}")
    return _BACKEND_DTYPES[backend]


def device_backend(device_type: str) -> str:
    """The backend that runs ops on `device_type` when none is forced: C++ on a CPU, Triton on CUDA,
    the reference elsewhere."""
    return _DEVICE_BACKEND.get(device_type, "reference")


def all_dtypes() -> tuple[torch.dtype, ...]:
    """Every dtype some backend takes: what fastdiff.ops accepts at its door."""
    return tuple(dict.fromkeys(d for dtypes in _BACKEND_DTYPES.values() for d in dtypes))


def device_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """The dtypes fastdiff's models run on `device_type`: those of the backend that runs there
    (fp32 and bf16 on a CPU; fp16 too on CUDA), fp32 on any other device."""
    backend = device_backend(device_type)
    return backend_dtypes(backend) if backend != "reference" else (torch.float32,)


def fast_dtypes(device_type: str = "cpu") -> tuple[torch.dtype, ...]:
    """The dtypes with a fast path on `device_type`: fp32 always; on CUDA bf16 and fp16; on a CPU
    bf16 only with BF16 dot products."""
    if device_type == "cuda":
        return device_dtypes("cuda")
    if device_type == "cpu" and any(flag in cpu_flags() for flag in BF16_DOT_FLAGS):
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes torch's oneDNN runs dense products in on this CPU: none without oneDNN; fp32; bf16
    where oneDNN has a bf16 path (AVX-512 or AVX-NE-CONVERT: elsewhere its weight reorder raises).
    torch has no public query for the latter, so its own check answers."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
