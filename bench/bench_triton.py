"""Triton kernels vs the torch ops they replace, at SD1.5 / MobileDiffusion 512×512 sizes (CUDA only).

    .venv/bin/python -m pytest bench/bench_triton.py --benchmark-only --benchmark-group-by=group,param:dtype

Baselines: attention vs F.scaled_dot_product_attention (flash / memory-efficient backends) and,
for ReLU attention, the materialised relu(q kᵀ) v; group norm vs F.group_norm + F.silu; GLU vs
chunk + gelu/silu + mul; separable conv vs two cuDNN convolutions (depthwise, then 1×1) on
channels_last. Every timed call ends with a device synchronise, so a round is a full kernel run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton benchmarks need a CUDA device")]

DTYPES = [torch.float16, torch.bfloat16]
IMPLS = ["fastdiff", "torch"]



def _run(benchmark, fn, *args, **kwargs):
    """Time fn(*args) with a synchronise per round; also returns one result for a sanity check.
    fastdiff ops run on the triton backend by name, so a broken Triton import fails instead of
    silently timing the reference fallback."""

    def call():
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    with ops.use_backend("triton"):
        for _ in range(3):  # Triton compiles / cuDNN plan selection outside the timed rounds
            call()
        return benchmark.pedantic(call, rounds=50, iterations=5, warmup_rounds=2)


def _randn(*shape, dtype, memory_format=torch.contiguous_format):
    return torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)


# (batch, seqlen_q, seqlen_k, heads, headdim, kind)
ATTENTION = {
    "self-4096-d40": (2, 4096, 4096, 8, 40, "softmax"),
    "self-1024-d80": (2, 1024, 1024, 8, 80, "softmax"),
    "self-256-d160": (2, 256, 256, 8, 160, "softmax"),
    "cross-4096x77-d40": (2, 4096, 77, 8, 40, "softmax"),
    "relu-1024-d64": (2, 1024, 1024, 10, 64, "relu"),
}


def _torch_attention(q, k, v, kind):
    # (B, L, H, D) -> (B, H, L, D) views, as a diffusers attention processor would pass them.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kind == "relu":
        weights = torch.relu(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5) / k.shape[-2]
        return (weights @ v).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention(benchmark, name, dtype, impl):
    B, Lq, Lk, H, D, kind = ATTENTION[name]
    benchmark.group = f"attention {name}"
    q, k, v = _randn(B, Lq, H, D, dtype=dtype), _randn(B, Lk, H, D, dtype=dtype), _randn(B, Lk, H, D, dtype=dtype)
    if impl == "fastdiff":
        out = _run(benchmark, ops.attention, q, k, v, kind=kind)
    else:
        out = _run(benchmark, _torch_attention, q, k, v, kind)
    assert torch.isfinite(out).all()


GROUP_NORM = {"320x64x64": (2, 320, 64, 64), "640x32x32": (2, 640, 32, 32), "1280x16x16": (2, 1280, 16, 16)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _torch_group_norm_silu(x, groups, weight, bias):
    return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(GROUP_NORM))
def test_group_norm_silu(benchmark, name, layout, dtype, impl):
    shape = GROUP_NORM[name]
    benchmark.group = f"group_norm+silu {name} {layout}"
    x = _randn(*shape, dtype=dtype, memory_format=LAYOUTS[layout])
    w, b = _randn(shape[1], dtype=dtype), _randn(shape[1], dtype=dtype)
    if impl == "fastdiff":
        out = _run(benchmark, ops.group_norm, x, 32, w, b, silu=True)
    else:
        out = _run(benchmark, _torch_group_norm_silu, x, 32, w, b)
    assert torch.isfinite(out).all()


GLU = {"4096x1280": (2, 4096, 2 * 1280), "1024x2560": (2, 1024, 2 * 2560)}


def _torch_glu(h, activation):
    a, gate = h.chunk(2, dim=-1)
    return a * (F.gelu(gate) if activation == "gelu" else F.silu(gate))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("name", list(GLU))
def test_glu(benchmark, name, activation, dtype, impl):
    shape = GLU[name]
    benchmark.group = f"glu-{activation} {name}"
    h = _randn(*shape, dtype=dtype)
    if impl == "fastdiff":
        out = _run(benchmark, ops.glu, h, activation=activation)
    else:
        out = _run(benchmark, _torch_glu, h, activation)
    assert torch.isfinite(out).all()


SEPARABLE = {"320ch-64x64": ((2, 320, 64, 64), 320), "640ch-32x32": ((2, 640, 32, 32), 640), "1024ch-16x16": ((2, 1024, 16, 16), 1024)}


def _torch_separable(x, dw_w, dw_b, pw_w, pw_b):
    return F.conv2d(F.conv2d(x, dw_w, dw_b, padding=1, groups=x.shape[1]), pw_w, pw_b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SEPARABLE))
def test_separable_conv2d(benchmark, name, dtype, impl):
    (N, C, H, W), C_out = SEPARABLE[name]
    benchmark.group = f"separable_conv2d {name}"
    torch.backends.cudnn.benchmark = True
    x = _randn(N, C, H, W, dtype=dtype, memory_format=torch.channels_last)
    dw_w, dw_b = _randn(C, 1, 3, 3, dtype=dtype) / 3, _randn(C, dtype=dtype)
    pw_w, pw_b = (_randn(C_out, C, 1, 1, dtype=dtype) / C**0.5).contiguous(memory_format=torch.channels_last), _randn(C_out, dtype=dtype)
    if impl == "fastdiff":
        out = _run(benchmark, ops.separable_conv2d, x, dw_w, dw_b, pw_w, pw_b)
    else:
        out = _run(benchmark, _torch_separable, x, dw_w, dw_b, pw_w, pw_b)
    assert torch.isfinite(out).all()
