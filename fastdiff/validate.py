"""Validation against the reference twins: the one tolerance table, the error metric, the comparison.

Used by the test suite (tests/helpers.py) and by `fastdiff validate`. A kernel's output is
compared with its reference twin evaluated in float64 on the same rounded inputs:
‖out − ref‖ / ‖ref‖ ≤ 1e-5 in fp32; in bf16/fp16 at most twice torch's own error for the same
computation in that dtype, with a floor. Outputs are poisoned with NaN before each run, so
elements a kernel never writes show up as NaN.
"""
from __future__ import annotations

import dataclasses

import torch

import fastdiff.ops as ops
from fastdiff.ops import reference

FP32_BOUND = 1e-5
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


@dataclasses.dataclass
class Comparison:
    op: str
    backend: str
    dtype: torch.dtype
    error: float
    bound: float
    problem: str | None  # why it failed beyond the error (NaN, wrong shape or dtype), else None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.error <= self.bound

    def describe(self) -> str:
        what = self.problem or f"relative error {self.error:.3e} {'<=' if self.passed else '>'} bound {self.bound:.3e}"
        return f"{self.op} [{self.backend}, {str(self.dtype).removeprefix('torch.')}]: {what}"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def default_cast(value, dtype, device):
    return value.to(device=device, dtype=dtype) if isinstance(value, torch.Tensor) else value


def compare(op: str, args: tuple, kwargs: dict, backend: str, dtype: torch.dtype, *, device="cpu", cast=None):
    """Run ops.<op> on `backend` in `dtype` against reference.<op> in float64.

    args: float64 CPU tensors (or None / plain values); `cast(value, dtype, device)` may replace
    the plain cast, e.g. to make strided views or channels_last inputs. Returns (output, Comparison).
    """
    cast = cast or default_cast
    low = tuple(cast(a, dtype, device) for a in args)
    truth = getattr(reference, op)(*(default_cast(a, torch.float64, "cpu") for a in low), **kwargs)
    with ops.use_backend(backend), ops.poison_outputs():
        out = getattr(ops, op)(*low, **kwargs)
    if dtype == torch.float32:
        bound = FP32_BOUND
    else:
        torch_error = rel_error(getattr(reference, op)(*low, **kwargs), truth)
        bound = max(LOW_PRECISION_FACTOR * torch_error, LOW_PRECISION_FLOOR[dtype])
    problem = None
    if out.dtype != dtype:
        problem = f"output dtype {out.dtype}, expected {dtype}"
    elif out.shape != truth.shape:
        problem = f"output shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    elif not torch.isfinite(out).all():
        problem = "output has NaN/inf (unwritten or overflowed elements)"
    error = rel_error(out, truth) if problem is None else float("nan")
    return out, Comparison(op, backend, dtype, error, bound, problem)
