"""C++ CPU fused separable conv vs torch: depthwise conv2d + 1x1 conv2d, and the 1x1 conv ALONE
(the floor: the fused kernel's target is to be within 10% of it).

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_separable_conv.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

MobileDiffusion's shapes (fastdiff.shapes), channels_last inputs for every side, same dtype,
2 threads. GFLOP/s counts the pointwise GEMM only (2 * N * H * W * C * C_out).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp
from fastdiff.shapes import model_cases

pytestmark = needs_cpp

CASES = {c.name: c for c in model_cases("separable_conv2d")}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("impl", ["torch-1x1-only", "torch-dw+1x1", "fastdiff"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_separable_conv(benchmark, name, dtype, impl):
    c = CASES[name]
    N, C, H, W = c.shape
    C_out = c.out_channels
    benchmark.group = f"separable_conv {c.label} {dtype_id(dtype)}"
    (x, dw_weight, dw_bias, pw_weight, pw_bias), _ = c.inputs(dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    if impl == "torch-1x1-only":
        fn = lambda: F.conv2d(x, pw_weight, pw_bias)
    elif impl == "torch-dw+1x1":
        fn = lambda: F.conv2d(F.conv2d(x, dw_weight, dw_bias, padding=1, groups=C), pw_weight, pw_bias)
    else:

        def fn():
            with ops.use_backend("cpp"):
                return ops.separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias)

    out = benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    benchmark.extra_info["GFLOP/s"] = 2 * N * H * W * C * C_out / benchmark.stats.stats.median / 1e9
    assert out.shape == (N, C_out, H, W) and torch.isfinite(out).all()
