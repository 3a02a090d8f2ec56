"""fastdiff's kernels as real torch ops: torch.ops.fastdiff.{attention, separable_conv2d, group_norm, glu}.

Each op is a `torch.library.custom_op` with
  * one implementation for every device, which picks the backend (`_dispatch.select`: C++, Triton
    or the reference twin, by device, FASTDIFF_BACKEND / use_backend) when it runs, so a
    torch.compile'd graph holds one opaque node per op and the choice stays a run-time one;
  * a fake (meta) implementation giving the shape, dtype and strides the op promises
    (attention, glu: contiguous; separable_conv2d: channels_last; group_norm: x's memory format);
    the real implementation copies into that layout in the rare case a kernel returns another;
  * a backward: the vector-Jacobian product of the reference twin (fastdiff.ops.reference),
    recomputed from the saved inputs with torch.func.vjp. Gradients are plain PyTorch's (the
    attention backward forms the score matrix); the forward still runs on the fast kernel.

Arguments are checked by fastdiff.ops (the public door), not here: call the door.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, reference

__all__ = ["attention", "separable_conv2d", "group_norm", "glu", "FAST_HEAD_DIMS"]

FAST_HEAD_DIMS = (8, 256)  # head dims the C++ and Triton attention kernels take


# ----------------------------------------------------------------------------------------------
# layouts the ops promise (shared by the real and the fake implementations)


def _contiguous_like(out: Tensor) -> Tensor:
    return out if out.is_contiguous() else out.contiguous()


def _channels_last_strides(shape) -> tuple[int, ...]:
    N, C, H, W = shape
    return (H * W * C, 1, W * C, C)


def _norm_is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _with_strides(out: Tensor, strides: tuple[int, ...]) -> Tensor:
    """out, or a copy of it with exactly `strides` (what the fake implementation announced)."""
    if out.stride() == strides:
        return out
    copy = torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device)
    copy.copy_(out)
    return copy


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


# ----------------------------------------------------------------------------------------------
# the ops


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Optional[Tensor], scale: float, kind: str) -> Tensor:
    """(B, Lq, H, D) queries, (B, Lk, H, D) keys (and values when v is None) -> (B, Lq, H, D), contiguous."""
    backend = _dispatch.select("attention", q.device.type)
    low, high = FAST_HEAD_DIMS
    D = q.shape[-1]
    if not low <= D <= high:
        backend = _dispatch.reference_for("attention", backend, f"head dim {D} is outside the fast kernels' {low}..{high}")
    out = backend.attention(q, k, v, scale=scale, kind=kind)
    return _with_strides(out, _contiguous_strides(out.shape))


@attention.register_fake
def _(q, k, v, scale, kind):
    return q.new_empty(q.shape)


@torch.library.custom_op("fastdiff::separable_conv2d", mutates_args=())
def separable_conv2d(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                     pw_bias: Optional[Tensor]) -> Tensor:
    """Depthwise 3x3 then pointwise 1x1: (N, C, H, W) -> (N, C_out, H, W), channels_last."""
    out = _dispatch.select("separable_conv2d", x.device.type).separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias)
    return _with_strides(out, _channels_last_strides(out.shape))


@separable_conv2d.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias):
    shape = (x.shape[0], pw_weight.shape[0], x.shape[2], x.shape[3])
    return x.new_empty_strided(shape, _channels_last_strides(shape))


@torch.library.custom_op("fastdiff::group_norm", mutates_args=())
def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               silu: bool) -> Tensor:
    """GroupNorm (+ SiLU): x's shape and dtype; channels_last when x is (and is not also contiguous), else contiguous."""
    out = _dispatch.select("group_norm", x.device.type).group_norm(x, num_groups, weight, bias, eps, silu=silu)
    return _with_strides(out, _group_norm_strides(x))


def _group_norm_strides(x: Tensor) -> tuple[int, ...]:
    return _channels_last_strides(x.shape) if _norm_is_channels_last(x) else _contiguous_strides(x.shape)


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    return x.new_empty_strided(x.shape, _group_norm_strides(x))


@torch.library.custom_op("fastdiff::glu", mutates_args=())
def glu(h: Tensor, activation: str) -> Tensor:
    """a * act(gate) with a, gate = h.chunk(2, -1): (..., 2F) -> (..., F), contiguous."""
    out = _dispatch.select("glu", h.device.type).glu(h, activation=activation)
    return _with_strides(out, _contiguous_strides(out.shape))


@glu.register_fake
def _(h, activation):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


# ----------------------------------------------------------------------------------------------
# backward: the reference twin's vector-Jacobian product


def _vjp(function, primals, grad):
    """Gradients of function(*primals) against `grad`; None for primals that are None."""
    present = [i for i, p in enumerate(primals) if p is not None]

    def of_present(*tensors):
        args = list(primals)
        for i, t in zip(present, tensors):
            args[i] = t
        return function(*args)

    _, pullback = torch.func.vjp(of_present, *(primals[i] for i in present))
    grads = [None] * len(primals)
    for i, g in zip(present, pullback(grad)):
        grads[i] = g
    return grads


def _save_tensors(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor) or t is None))
    ctx.others = [t for t in inputs if not (isinstance(t, Tensor) or t is None)]


def _attention_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    scale, kind = ctx.others
    dq, dk, dv = _vjp(lambda q, k, v: reference.attention(q, k, v, scale=scale, kind=kind), (q, k, v), grad)
    return dq, dk, dv, None, None


def _separable_conv2d_backward(ctx, grad):
    grads = _vjp(reference.separable_conv2d, ctx.saved_tensors, grad)
    return tuple(grads)


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.others = (num_groups, eps, silu)


def _group_norm_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, silu = ctx.others
    dx, dweight, dbias = _vjp(lambda x, w, b: reference.group_norm(x, num_groups, w, b, eps, silu=silu), (x, weight, bias), grad)
    return dx, None, dweight, dbias, None, None


def _glu_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    (activation,) = ctx.others
    return _vjp(lambda h: reference.glu(h, activation=activation), (h,), grad)[0], None


attention.register_autograd(_attention_backward, setup_context=_save_tensors)
separable_conv2d.register_autograd(_separable_conv2d_backward, setup_context=_save_tensors)
group_norm.register_autograd(_group_norm_backward, setup_context=_group_norm_setup)
glu.register_autograd(_glu_backward, setup_context=_save_tensors)
