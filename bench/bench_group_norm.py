"""C++ CPU group_norm + fused SiLU vs F.silu(F.group_norm(x)) at SD1.5 512x512 sizes.

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_group_norm.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

One group per shape x dtype x memory format, batch 2, 32 groups, 2 threads; both sides get the same
input tensor. Bytes moved per call: x read + y written (fastdiff reads x twice, from cache).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp

pytestmark = needs_cpp

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
DTYPES = [torch.float32, torch.bfloat16]
FORMATS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}




@pytest.mark.parametrize("impl", ["torch", "fastdiff"])
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, shape, dtype, layout, impl):
    benchmark.group = f"group_norm+silu {'x'.join(map(str, shape))} {dtype_id(dtype)} {layout}"
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=FORMATS[layout])
    weight, bias = torch.randn(C, generator=gen).to(dtype), torch.randn(C, generator=gen).to(dtype)
    if impl == "torch":
        fn = lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-5))
    else:

        def fn():
            with ops.use_backend("cpp"):
                return ops.group_norm(x, 32, weight, bias, 1e-5, silu=True)

    out = benchmark.pedantic(fn, rounds=30, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = 2 * x.numel() * x.element_size() / benchmark.stats.stats.median / 1e9
    assert out.shape == x.shape and torch.isfinite(out).all()
