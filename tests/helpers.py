"""Shared test machinery: the one tolerance table, the error metric, backend parameters.

Every kernel is compared with its reference twin evaluated in float64 on the same (rounded)
inputs. Outputs are poisoned with NaN before each run, so elements a kernel never writes fail.
"""
from __future__ import annotations

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import reference

# fp32: a fixed bound. Low precision: at most 2x torch's own error for the same computation in
# that dtype, with a floor for cases where torch happens to round only once.
FP32_BOUND = 1e-5
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}

HAS_CUDA = torch.cuda.is_available()


def _backend_error(name):
    status = ops.backends()[name]
    return None if status == "available" else status


def backend_param(name):
    """pytest.param for backend `name`, skipped with the reason when it cannot run here."""
    why = _backend_error(name)
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"{name}: {why}"), id=name)


def device_for(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def dtypes_for(backend):
    """Dtypes each backend is tested in. Triton's interpreter (3.9) computes bf16 tl.dot wrongly,
    so bf16 Triton runs are checked on a GPU only; fp16 is a GPU dtype (and interpreter-exact)."""
    if backend == "cpp":
        return [torch.float32, torch.bfloat16]
    if backend == "triton":
        return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
    return [torch.float32, torch.bfloat16]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _cast(value, dtype, device):
    return value.to(device=device, dtype=dtype) if isinstance(value, torch.Tensor) else value


def check_against_reference(op: str, args: tuple, kwargs: dict, backend: str, dtype: torch.dtype, *, cast=None):
    """Run ops.<op> on `backend` in `dtype` and compare with reference.<op> in float64.

    args: float64 CPU tensors (or None / plain values). `cast(tensor, dtype, device)` may
    replace the default cast, e.g. to build strided views or channels_last inputs.
    Returns (output, error, bound).
    """
    cast = cast or _cast
    device = device_for(backend)
    low = tuple(cast(a, dtype, device) for a in args)
    truth = getattr(reference, op)(*(_cast(a, torch.float64, "cpu") for a in low), **kwargs)
    with ops.use_backend(backend), ops.poison_outputs():
        out = getattr(ops, op)(*low, **kwargs)
    assert out.dtype == dtype, f"{op}: output dtype {out.dtype}, expected {dtype}"
    assert out.shape == truth.shape, f"{op}: output shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{op}: output has NaN/inf (unwritten or overflowed elements)"
    err = rel_error(out, truth)
    if dtype == torch.float32:
        bound = FP32_BOUND
    else:
        torch_err = rel_error(getattr(reference, op)(*low, **kwargs), truth)
        bound = max(LOW_PRECISION_FACTOR * torch_err, LOW_PRECISION_FLOOR[dtype])
    assert err <= bound, f"{op} [{backend}, {dtype}]: relative error {err:.3e} > bound {bound:.3e}"
    return out, err, bound
