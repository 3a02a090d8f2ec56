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
