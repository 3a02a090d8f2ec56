"""C++ CPU fused separable conv vs torch: depthwise conv2d + 1x1 conv2d, and the 1x1 conv ALONE
(the floor: the fused kernel's target is to be within 10% of it).

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_separable_conv.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

MobileDiffusion / SD shapes at batch 2 (C -> C), channels_last inputs for every side, same dtype,
2 threads. GFLOP/s counts the pointwise GEMM only (2 * N * H * W * C * C_out).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp

pytestmark = needs_cpp

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1024, 16, 16), (2, 1280, 16, 16)]
DTYPES = [torch.float32, torch.bfloat16]




@pytest.mark.parametrize("impl", ["torch-1x1-only", "torch-dw+1x1", "fastdiff"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_separable_conv(benchmark, shape, dtype, impl):
    N, C, H, W = shape
    benchmark.group = f"separable_conv {'x'.join(map(str, shape))}->{C} {dtype_id(dtype)}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    dw_weight = (torch.randn(C, 1, 3, 3, generator=gen) / 3).to(dtype)
    pw_weight = (torch.randn(C, C, 1, 1, generator=gen) / C**0.5).to(dtype)
    dw_bias, pw_bias = (torch.randn(C, generator=gen).to(dtype) for _ in range(2))
    if impl == "torch-1x1-only":
        fn = lambda: F.conv2d(x, pw_weight, pw_bias)
    elif impl == "torch-dw+1x1":
        fn = lambda: F.conv2d(F.conv2d(x, dw_weight, dw_bias, padding=1, groups=C), pw_weight, pw_bias)
    else:

        def fn():
            with ops.use_backend("cpp"):
                return ops.separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias)

    out = benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    benchmark.extra_info["GFLOP/s"] = 2 * N * H * W * C * C / benchmark.stats.stats.median / 1e9
    assert out.shape == (N, C, H, W) and torch.isfinite(out).all()
