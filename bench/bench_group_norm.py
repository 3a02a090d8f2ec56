"""C++ CPU group_norm (+ fused SiLU) vs F.group_norm (+ F.silu) at the real models' shapes (fastdiff.shapes).

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_group_norm.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

One group per model case x dtype x memory format (SD1.5, InstructPix2Pix, MobileDiffusion, the VAE
decoder), 2 threads; both sides get the same input tensor and the case's groups, eps and SiLU.
Bytes moved per call: x read + y written (fastdiff reads x twice, from cache).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp
from fastdiff.shapes import model_cases

pytestmark = needs_cpp

CASES = {c.name: c for c in model_cases("group_norm")}
DTYPES = [torch.float32, torch.bfloat16]
FORMATS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}


@pytest.mark.parametrize("impl", ["torch", "fastdiff"])
@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_group_norm_silu(benchmark, name, dtype, layout, impl):
    c = CASES[name]
    benchmark.group = f"group_norm {c.label} {dtype_id(dtype)} {layout}"
    (x, groups, weight, bias, eps), _ = c.inputs(dtype=dtype)
    x = x.contiguous(memory_format=FORMATS[layout])
    if impl == "torch":
        fn = (lambda: F.silu(F.group_norm(x, groups, weight, bias, eps))) if c.silu else (lambda: F.group_norm(x, groups, weight, bias, eps))
    else:

        def fn():
            with ops.use_backend("cpp"):
                return ops.group_norm(x, groups, weight, bias, eps, silu=c.silu)

    out = benchmark.pedantic(fn, rounds=30, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = 2 * x.numel() * x.element_size() / benchmark.stats.stats.median / 1e9
    assert out.shape == x.shape and torch.isfinite(out).all()
