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

    fp32 and fp64 (the ground truth) are computed here in two passes, not by F.group_norm: torch's
    CPU kernel forms channels_last statistics as E[x^2] - E[x]^2 and applies the norm as
    x * scale + (bias - mean * scale), both of which cancel when a group's mean is large against its
    spread (groups at 0.5 with 1e-5 noise: 2e-3 to 3e-3 relative error in fp32, against 1e-5 allowed).
    bf16 and fp16 stay F.group_norm: plain torch's own error is what the tolerance table measures.
    """
    if x.dtype in (torch.float32, torch.float64):
        out = _group_norm_two_pass(x, num_groups, weight, bias, eps)
    else:
        out = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        out = F.silu(out)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _group_norm_two_pass(x, num_groups, weight, bias, eps):
    """Mean, then the variance of x - mean (no E[x^2] - E[x]^2), with the corrected two-pass step:
    x - mean is exact for x near the mean, so subtracting the mean of those differences removes the
    rounding of the mean itself; the affine map is applied to the centered values."""
    groups = x.reshape(x.shape[0], num_groups, -1)  # NCHW order (a copy for channels_last x)
    centered = groups - groups.mean(-1, keepdim=True)
    centered = centered - centered.mean(-1, keepdim=True)
    variance = centered.square().mean(-1, keepdim=True)
    out = (centered * torch.rsqrt(variance + eps)).reshape(x.shape)
    per_channel = (-1,) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(per_channel)
    if bias is not None:
        out = out + bias.reshape(per_channel)
    return out


def glu(h, *, activation="gelu"):
    """h: (..., 2 * F). Returns a * act(gate) with a, gate = h.chunk(2, -1): (..., F).

    activation="gelu" (exact, erf) is SD's GEGLU; "silu" is MobileDiffusion's SwiGLU.
    """
    a, gate = h.chunk(2, dim=-1)
    act = F.gelu(gate) if activation == "gelu" else F.silu(gate)
    return a * act


def linear(x, weight, bias=None, residual=None):
    """x: (..., I); weight: (O, I), or (O, I, 1, 1) (a 1x1 convolution applied to tokens); bias: (O,)
    or None; residual: (..., O) or None. Returns x·weightᵀ + bias + residual: (..., O)."""
    out = F.linear(x, weight.flatten(1) if weight.dim() == 4 else weight, bias)
    return out if residual is None else out + residual


def conv2d(x, weight, bias=None, residual=None, *, stride=1, padding=0, dilation=1, groups=1):
    """x: (N, C, H, W); weight: (O, C / groups, kh, kw); bias: (O,) or None; zero padding;
    residual: the output's shape, or None. Returns F.conv2d(...) + residual, channels_last."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return out.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# int8 (W8A8): the contract of csrc/int8_linear.cpp, computed exactly (int products in float64)

INT8_ZERO_ROW = 1e-30  # a row of x with max|x| at most this quantizes to zeros (its 127/max would overflow fp32)


def quantize_weight_int8(weight):
    """weight: (O, I) float. Per output channel, symmetric: scale = max|w[o]| / 127 (fp32),
    qweight = round(w / scale) (0 for an all-zero row). Returns (qweight (O, I) int8 in [-127, 127],
    scale (O,) float32)."""
    scale = weight.detach().abs().amax(1).float() / 127
    inverse = torch.where(scale > 0, 1 / scale.double(), 0.0)
    qweight = (weight.detach().double() * inverse[:, None]).round().clamp(-127, 127).to(torch.int8)
    return qweight, scale


def quantize_rows_int8(x):
    """x: (..., I), quantized per row (per token) as the kernels do it, in fp32: absmax = max|x|,
    q = round(x * (127 / absmax)) (fp32 product, ties to even), scale = absmax / 127; rows with
    absmax <= INT8_ZERO_ROW: q = 0, and their scale is absmax / 127. Returns (q (..., I) float32
    holding integers in [-127, 127], scale (..., 1) float32)."""
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True)
    inverse = torch.where(absmax > INT8_ZERO_ROW, 127 / absmax, torch.zeros_like(absmax))
    return (x * inverse).round().clamp(-127, 127), absmax / 127


def linear_int8(x, weight, bias=None, residual=None):
    """x: (..., I) float; weight: an ops.Int8Weight (.qweight (O, I) int8, .scale (O,) float32);
    bias: (O,) or None; residual: (..., O) or None. Returns, in x's dtype,
    scale_x[row] * weight.scale * (q_x · qweightᵀ) + bias (+ residual): the rows of x quantized by
    quantize_rows_int8, the integer sums and everything after them in float64 (exact sums)."""
    q, row_scale = quantize_rows_int8(x)
    sums = q.double() @ weight.qweight.double().T
    out = sums * (row_scale.double() * weight.scale.double())
    if bias is not None:
        out = out + bias.double()
    out = out.to(x.dtype)
    return out if residual is None else out + residual


def conv2d_int8(x, weight, bias=None, residual=None, *, stride, padding, dilation):
    """x: (N, C, H, W) float; weight: an ops.Int8Weight of an (O, C, kh, kw) convolution (groups 1,
    zero padding; stride, padding, dilation: pairs). linear_int8 on F.unfold's patches, each output
    pixel's patch a row (the im2col twin of the kernels' gathered patches). Returns channels_last
    (N, O, H', W') in x's dtype."""
    N, (kh, kw) = x.shape[0], weight.kernel_size
    out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * ((kh, kw)[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride).transpose(1, 2)  # (N, H'W', C*kh*kw)
    out = linear_int8(patches, weight, bias).view(N, *out_hw, weight.out_features)
    if residual is not None:
        out = out + residual.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)
