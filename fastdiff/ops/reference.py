"""Reference twins: every kernel's contract in plain PyTorch, with the kernel's signature.

These define what the C++ and Triton kernels compute. Tests evaluate them in float64 as ground
truth and in bf16/fp16 to measure torch's own low-precision error. They compute in the input
dtype (no upcasts) so that a low-precision run shows what plain torch would give.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q, k, v=None, *, scale=None, kind="softmax"):
    """q: (batch, seqlen_q, heads, headdim); k, v: (batch, seqlen_k, heads, headdim).

    v=None means shared K/V: the same tensor serves as keys and values.
    kind="softmax": softmax(q kᵀ · scale) v.  kind="relu": relu(q kᵀ · scale) v / seqlen_k.
    Returns (batch, seqlen_q, heads, headdim).
    """
    if v is None:
        v = k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    if kind == "softmax":
        weights = torch.softmax(scores, dim=-1)
    else:
        weights = torch.relu(scores) / k.shape[1]
    return torch.einsum("bhqk,bkhd->bqhd", weights, v).contiguous()


def separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias):
    """x: (N, C, H, W); dw_weight: (C, 1, 3, 3); dw_bias: (C,) or None;
    pw_weight: (C_out, C, 1, 1) or (C_out, C); pw_bias: (C_out,) or None.

    Depthwise 3x3 (stride 1, padding 1) then pointwise 1x1. Returns (N, C_out, H, W), channels_last.
    """
    depthwise = F.conv2d(x, dw_weight, dw_bias, padding=1, groups=x.shape[1])
    pointwise = F.conv2d(depthwise, pw_weight.reshape(pw_weight.shape[0], -1, 1, 1), pw_bias)
    return pointwise.contiguous(memory_format=torch.channels_last)


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, silu=False):
    """x: (N, C, H, W) in either memory format; weight, bias: (C,) or None.

    GroupNorm over num_groups groups of C // num_groups channels, then SiLU if silu=True.
    Returns x's shape, dtype and memory format.
    """
    out = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        out = F.silu(out)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def glu(h, *, activation="gelu"):
    """h: (..., 2 * F). Returns a * act(gate) with a, gate = h.chunk(2, -1): (..., F).

    activation="gelu" (exact, erf) is SD's GEGLU; "silu" is MobileDiffusion's SwiGLU.
    """
    a, gate = h.chunk(2, dim=-1)
    act = F.gelu(gate) if activation == "gelu" else F.silu(gate)
    return a * act
