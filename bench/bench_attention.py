"""C++ CPU attention vs F.scaled_dot_product_attention at the real models' shapes (fastdiff.shapes).

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_attention.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

One group per model case x dtype (SD1.5, InstructPix2Pix, MobileDiffusion), 2 threads. Each side gets its preferred layout, made outside
the timed call: SDPA (B, H, L, D) contiguous tensors, fastdiff (B, L, H, D) (what a projection
reshaped per head gives). "fastdiff-shared" passes v=None (one K/V projection, read once).
ReLU attention (MobileDiffusion) is compared with its materialised torch form, relu(q kᵀ·s)/Lk · v.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp
from fastdiff.shapes import model_cases

pytestmark = needs_cpp

SHAPES = {c.name: c for c in model_cases("attention")}
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["torch", "fastdiff", "fastdiff-shared"]  # fastdiff: separate V; -shared: v=None, whatever the case's model does


def _torch_relu_attention(q, k, v):
    weights = torch.relu(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5) / k.shape[-2]
    return weights @ v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SHAPES))
def test_attention(benchmark, name, dtype, impl):
    c = SHAPES[name]
    B, Lq, Lk, H, D = c.dims
    kind = c.kind
    benchmark.group = f"attention {name} {dtype_id(dtype)}"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype) for L in (Lq, Lk, Lk))  # (B, H, L, D)
    if impl == "torch":
        fn = (lambda: _torch_relu_attention(q, k, v)) if kind == "relu" else (lambda: F.scaled_dot_product_attention(q, k, v))
        expected = (B, H, Lq, D)
    else:
        ql, kl, vl = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, L, H, D)
        vl = None if impl == "fastdiff-shared" else vl

        def fn():
            with ops.use_backend("cpp"):
                return ops.attention(ql, kl, vl, kind=kind)

        expected = (B, Lq, H, D)
    out = benchmark.pedantic(fn, rounds=7 if Lq * Lk > 2**22 else 20, warmup_rounds=1)
    assert out.shape == expected and torch.isfinite(out).all()
