"""Shared test machinery: backend parameters and the comparison with the reference twins.

The tolerance table and the error metric live in fastdiff.validate (also used by
`fastdiff validate`); this file adapts them to pytest.
"""
from __future__ import annotations

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.validate import FP32_BOUND, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, compare, rel_error  # noqa: F401

HAS_CUDA = torch.cuda.is_available()


def backend_param(name):
    """pytest.param for backend `name`, skipped with the reason when it cannot run here."""
    status = ops.backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(status != "available", reason=f"{name}: {status}"), id=name)


def device_for(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def dtypes_for(backend):
    """Dtypes each backend is tested in. Triton's interpreter (3.9) computes bf16 tl.dot wrongly,
    so bf16 Triton runs are checked on a GPU only; fp16 is a GPU dtype (and interpreter-exact)."""
    if backend == "triton":
        return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
    return [torch.float32, torch.bfloat16]


def check_against_reference(op: str, args: tuple, kwargs: dict, backend: str, dtype: torch.dtype, *, cast=None):
    """Assert ops.<op> on `backend` in `dtype` matches reference.<op> in float64 (see fastdiff.validate.compare).

    args: float64 CPU tensors (or None / plain values). Returns (output, error, bound).
    """
    out, result = compare(op, args, kwargs, backend, dtype, device=device_for(backend), cast=cast)
    assert result.passed, result.describe()
    return out, result.error, result.bound


# Casts for check_against_reference: the same values in the memory layouts the kernels meet.


def fused_slot(slot, slots=3):
    """Cast that puts each tensor in slot `slot` of a NaN-filled (B, L, slots, H, D) buffer, like a
    fused qkv projection viewed per head: non-contiguous strides, and any read outside the view
    (e.g. of padded head dims) turns the output into NaN."""

    def cast(value, dtype, device):
        if not isinstance(value, torch.Tensor):
            return value
        B, L, H, D = value.shape
        fused = torch.full((B, L, slots, H, D), float("nan"), dtype=dtype, device=device)
        fused[:, :, slot] = value.to(device=device, dtype=dtype)
        return fused[:, :, slot]

    return cast


def heads_major(value, dtype, device):
    """(B, L, H, D) view of (B, H, L, D) storage: the layout of a head-split transpose."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)


def layout_cast(memory_format):
    """Cast that gives every 4-D tensor `memory_format` (e.g. channels_last feature maps)."""

    def cast(value, dtype, device):
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device=device, dtype=dtype)
        return value.contiguous(memory_format=memory_format) if value.dim() == 4 else value

    return cast
