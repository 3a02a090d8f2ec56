"""Every kernel beside its baselines at the real models' shapes, as pytest-benchmark groups (for
--benchmark-save / --benchmark-compare across commits):

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

The calls are fastdiff.bench.kernels' (the harness of `fastdiff bench kernels` and tools/gpu_check.py):
one group per device x case x dtype, fastdiff on the C++ backend on the CPU (2 threads) and on
Triton on CUDA, by name, so a broken backend fails instead of timing a fallback. Each fastdiff
row also records its GFLOP/s or GB/s.
"""
from __future__ import annotations

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.bench.kernels import dtype_name, kernel_cases, kernel_run

# device -> (fastdiff's backend, dtypes, pedantic rounds and calls per round)
DEVICES = {"cpu": ("cpp", [torch.float32, torch.bfloat16], 10, 1)}
if torch.cuda.is_available():
    DEVICES["cuda"] = ("triton", [torch.float16, torch.bfloat16], 50, 5)


def _baseline_names(case, device: str) -> list[str]:
    """The case's baselines on `device`: read off the harness at the case's tiny size (names do not depend on size)."""
    return list(kernel_run(case.reduced("tiny"), torch.float32, device).baselines)


PARAMS = [pytest.param(device, case, dtype, impl, id=f"{device}-{case.name}-{dtype_name(dtype)}-{impl}")
          for device, (_, dtypes, _, _) in DEVICES.items() for case in kernel_cases() for dtype in dtypes
          for impl in ["fastdiff", *_baseline_names(case, device)]]


@pytest.mark.parametrize("device, case, dtype, impl", PARAMS)
def test_kernel(benchmark, device, case, dtype, impl):
    backend, _, rounds, iterations = DEVICES[device]
    if ops.backends()[backend] != "available":
        pytest.skip(f"{backend} backend: {ops.backends()[backend]}")
    run = kernel_run(case, dtype, device, backend=backend)
    fn = run.fastdiff if impl == "fastdiff" else run.baselines[impl]

    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{device} {case.op} {case.name} {dtype_name(dtype)}"
    with torch.inference_mode():
        out = benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=2)
    if impl == "fastdiff":
        benchmark.extra_info[run.unit] = run.work / benchmark.stats.stats.median / 1e9
    assert torch.isfinite(out).all()
