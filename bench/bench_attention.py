"""C++ CPU attention vs F.scaled_dot_product_attention at SD1.5 / MobileDiffusion 512x512 sizes.

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_attention.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

One group per shape x dtype, batch 2, 2 threads. Each side gets its preferred layout, made outside
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

pytestmark = needs_cpp

# (batch, seqlen_q, seqlen_k, heads, headdim, kind)
SHAPES = {
    "sd-self-4096-d40": (2, 4096, 4096, 8, 40, "softmax"),
    "md-self-1024-d64": (2, 1024, 1024, 8, 64, "softmax"),
    "sd-self-1024-d80": (2, 1024, 1024, 8, 80, "softmax"),
    "sd-cross-4096x77-d40": (2, 4096, 77, 8, 40, "softmax"),
    "sd-cross-1024x77-d80": (2, 1024, 77, 8, 80, "softmax"),
    "sd-cross-256x77-d160": (2, 256, 77, 8, 160, "softmax"),
    "md-relu-1024-d64": (2, 1024, 1024, 8, 64, "relu"),
}
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["torch", "fastdiff", "fastdiff-shared"]




def _torch_relu_attention(q, k, v):
    weights = torch.relu(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5) / k.shape[-2]
    return weights @ v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SHAPES))
def test_attention(benchmark, name, dtype, impl):
    B, Lq, Lk, H, D, kind = SHAPES[name]
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
