"""Shared test machinery: backend parameters and the comparison with the reference twins.

The tolerance table and the error metric live in fastdiff.validate (also used by
`fastdiff validate`), the shapes in fastdiff.shapes; this file adapts them to pytest.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.shapes import FULL, QUICK, TINY
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


@dataclasses.dataclass(frozen=True)
class Run:
    """One backend in one dtype, on the table's cases reduced to `size`."""

    backend: str
    dtype: torch.dtype
    size: str
    id: str


# Which size each backend runs: the C++ kernels and the reference at QUICK (the float64 twin stays
# quick), Triton at TINY (its CPU interpreter is slow; on a GPU the same small set runs first), and
# "triton-full" the real sizes, on a CUDA device only.
_SIZE = {"cpp": QUICK, "reference": QUICK, "triton": TINY, "triton-full": FULL}


def runs(*backends: str, dot_free: bool = False, size: str | None = None) -> list:
    """pytest params of Run: each backend in each of its dtypes (dtypes_for), skipped with the reason
    when the backend cannot run here. dot_free: ops without tl.dot, which the interpreter also
    computes correctly in bf16. size: one size for every backend (e.g. TINY for tests of layouts
    and options, which need no large shapes) instead of each backend's own."""
    params = []
    for name in backends:
        backend = "triton" if name == "triton-full" else name
        status = ops.backends()[backend]
        marks = [pytest.mark.skipif(status != "available", reason=f"{backend}: {status}")]
        dtypes = dtypes_for(backend)
        if name == "triton-full":
            marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="real sizes need a CUDA device"), *marks]
            dtypes = [torch.float32, torch.float16, torch.bfloat16]
        elif backend == "triton" and dot_free and torch.bfloat16 not in dtypes:
            dtypes = dtypes + [torch.bfloat16]
        for dtype in dtypes:
            run_id = f"{name}-{str(dtype).removeprefix('torch.')}"
            params.append(pytest.param(Run(backend, dtype, size or _SIZE[name], run_id), id=run_id, marks=marks))
    return params


def case_params(cases, run_params, *, gpu_only_on_triton=()) -> list:
    """pytest params (case, run) of every case on every run, the case reduced to the run's size;
    a reduced case equal to an earlier one but for its name (several models' cases reduce to one
    TINY shape) is run once. Cases named in gpu_only_on_triton are left to a GPU: without CUDA
    their Triton runs skip (Triton's CPU interpreter is slow, and they repeat other cases' paths)."""
    params = []
    for run_param in run_params:
        run = run_param.values[0]
        seen = set()
        for case in cases:
            reduced = case.reduced(run.size)
            key = reduced.replace(name="", model="")
            if key in seen:
                continue
            seen.add(key)
            marks = list(run_param.marks)
            if run.backend == "triton" and case.name in gpu_only_on_triton:
                marks.append(pytest.mark.skipif(not HAS_CUDA, reason="Triton on a GPU only: the CPU interpreter takes the same paths in other cases"))
            params.append(pytest.param(reduced, run, id=f"{case.name}-{run.id}", marks=marks))
    return params


def check_case(case, run: Run, *, cast=None, args=None, **kwargs):
    """check_against_reference for a table case (already reduced) on `run`. args replaces the
    case's inputs (e.g. scaled ones); kwargs override the op's keyword arguments."""
    if args is None:
        args, _ = case.inputs()
    return check_against_reference(case.op, args, {**case.options, **kwargs}, run.backend, run.dtype, cast=cast)


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
