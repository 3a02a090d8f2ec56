"""Triton kernels vs the torch ops they replace, at the real models' shapes (fastdiff.shapes; CUDA only).

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
from fastdiff.shapes import model_cases

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


def _inputs(case, dtype):
    """The case's random inputs, made on the CPU in fp32 and moved to the GPU in `dtype`."""
    args, _ = case.inputs(dtype=torch.float32)
    return tuple(a.to(device="cuda", dtype=dtype) if isinstance(a, torch.Tensor) else a for a in args)


ATTENTION = {c.name: c for c in model_cases("attention")}


def _torch_attention(q, k, v, kind):
    # (B, L, H, D) -> (B, H, L, D) views, as a diffusers attention processor would pass them.
    v = k if v is None else v
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
    case = ATTENTION[name]
    kind = case.kind
    benchmark.group = f"attention {name}"
    q, k, v = _inputs(case, dtype)  # v None: shared K/V (MobileDiffusion)
    if impl == "fastdiff":
        out = _run(benchmark, ops.attention, q, k, v, kind=kind)
    else:
        out = _run(benchmark, _torch_attention, q, k, v, kind)
    assert torch.isfinite(out).all()


GROUP_NORM = {c.name: c for c in model_cases("group_norm")}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _torch_group_norm(x, groups, weight, bias, eps, *, silu):
    out = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(out) if silu else out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(GROUP_NORM))
def test_group_norm_silu(benchmark, name, layout, dtype, impl):
    case = GROUP_NORM[name]
    benchmark.group = f"group_norm {name} {layout}"
    x, groups, w, b, eps = _inputs(case, dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    if impl == "fastdiff":
        out = _run(benchmark, ops.group_norm, x, groups, w, b, eps, silu=case.silu)
    else:
        out = _run(benchmark, _torch_group_norm, x, groups, w, b, eps, silu=case.silu)
    assert torch.isfinite(out).all()


GLU = {c.name: c for c in model_cases("glu")}


def _torch_glu(h, activation):
    a, gate = h.chunk(2, dim=-1)
    return a * (F.gelu(gate) if activation == "gelu" else F.silu(gate))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("name", list(GLU))
def test_glu(benchmark, name, activation, dtype, impl):
    benchmark.group = f"glu-{activation} {name}"
    (h,) = _inputs(GLU[name], dtype)
    if impl == "fastdiff":
        out = _run(benchmark, ops.glu, h, activation=activation)
    else:
        out = _run(benchmark, _torch_glu, h, activation)
    assert torch.isfinite(out).all()


SEPARABLE = {c.name: c for c in model_cases("separable_conv2d")}


def _torch_separable(x, dw_w, dw_b, pw_w, pw_b):
    return F.conv2d(F.conv2d(x, dw_w, dw_b, padding=1, groups=x.shape[1]), pw_w, pw_b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SEPARABLE))
def test_separable_conv2d(benchmark, name, dtype, impl):
    benchmark.group = f"separable_conv2d {name}"
    torch.backends.cudnn.benchmark = True
    x, dw_w, dw_b, pw_w, pw_b = _inputs(SEPARABLE[name], dtype)
    x, pw_w = x.contiguous(memory_format=torch.channels_last), pw_w.contiguous(memory_format=torch.channels_last)
    if impl == "fastdiff":
        out = _run(benchmark, ops.separable_conv2d, x, dw_w, dw_b, pw_w, pw_b)
    else:
        out = _run(benchmark, _torch_separable, x, dw_w, dw_b, pw_w, pw_b)
    assert torch.isfinite(out).all()
