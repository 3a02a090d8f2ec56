# GroupNorm (+ optional fused SiLU) for (N, C, H, W) in NCHW or channels_last layout.
#
# Two kernels over the same (N·groups, splits) grid; each program owns one chunk of pixels of
# one group (all of the group's channels):
#   1. stats: fp32 partial sums of (x - shift) and (x - shift)² for its chunk. shift is the
#      group's first element, which keeps sum-of-squares cancellation small when |mean| >> std.
#   2. apply: combines the group's partials (a handful of floats) into mean / rstd, then writes
#      y = (x - mean)·(rstd·w) + b, SiLU'd if asked, in x's dtype and layout.
# Memory traffic: x read twice, y written once. Splitting groups over several programs keeps a
# GPU busy with only N·32 groups (64 programs for SD's batch of 2), and bounds the loop length
# for large groups.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output

_ELEMENTS_PER_PROGRAM = 8192  # per chunk: enough work to hide latency, enough chunks to fill the GPU


@triton.jit
def _group_stats_kernel(x_ptr, partial_ptr, group_channels, pixels, num_groups, pixels_per_split, num_splits,
                        stride_n, stride_c, stride_p,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    group_id = tl.program_id(0)  # n * num_groups + g
    split = tl.program_id(1)
    n = group_id // num_groups
    g = group_id % num_groups
    base = x_ptr + n.to(tl.int64) * stride_n + (g * group_channels).to(tl.int64) * stride_c
    shift = tl.load(base).to(tl.float32)

    p_start = split * pixels_per_split
    p_end = tl.minimum(p_start + pixels_per_split, pixels)
    sum_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    sq_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, group_channels, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        for p0 in range(p_start, p_end, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            mask = (chans[:, None] < group_channels) & (pix[None, :] < p_end)
            x = tl.load(base + chans[:, None] * stride_c + pix[None, :] * stride_p, mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - shift, 0.0)
            sum_acc += d
            sq_acc += d * d
    out = partial_ptr + (group_id * num_splits + split) * 2
    tl.store(out, tl.sum(tl.sum(sum_acc, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(sq_acc, axis=1), axis=0))


@triton.jit
def _group_norm_apply_kernel(x_ptr, out_ptr, weight_ptr, bias_ptr, partial_ptr,
                             group_channels, pixels, num_groups, pixels_per_split, num_splits, eps,
                             stride_n, stride_c, stride_p,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    group_id = tl.program_id(0)
    split = tl.program_id(1)
    n = group_id // num_groups
    g = group_id % num_groups
    offset = n.to(tl.int64) * stride_n + (g * group_channels).to(tl.int64) * stride_c
    shift = tl.load(x_ptr + offset).to(tl.float32)

    splits = tl.arange(0, BLOCK_SPLITS)
    partials = partial_ptr + (group_id * num_splits + splits) * 2
    split_ok = splits < num_splits
    count = group_channels * pixels * 1.0  # not .to(): both ints may be specialised to constexpr 1
    mean_shifted = tl.sum(tl.load(partials, mask=split_ok, other=0.0), axis=0) / count
    var = tl.maximum(tl.sum(tl.load(partials + 1, mask=split_ok, other=0.0), axis=0) / count - mean_shifted * mean_shifted, 0.0)
    mean = shift + mean_shifted
    rstd = 1.0 / tl.sqrt(var + eps)

    p_start = split * pixels_per_split
    p_end = tl.minimum(p_start + pixels_per_split, pixels)
    for c0 in range(0, group_channels, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        chan_ok = chans < group_channels
        if HAS_WEIGHT:
            scale = tl.load(weight_ptr + g * group_channels + chans, mask=chan_ok, other=0.0).to(tl.float32) * rstd
        else:
            scale = tl.full((BLOCK_C,), 1.0, dtype=tl.float32) * rstd
        if HAS_BIAS:
            bias = tl.load(bias_ptr + g * group_channels + chans, mask=chan_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            mask = chan_ok[:, None] & (pix[None, :] < p_end)
            idx = offset + chans[:, None] * stride_c + pix[None, :] * stride_p
            # (x - mean) first: folding mean into one affine offset would cancel badly when |mean| >> std.
            y = (tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) - mean) * scale[:, None] + bias[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, silu=False):
    N, C, H, W = x.shape
    pixels = H * W
    # Same rule as the reference: channels_last in, channels_last out; anything else -> NCHW.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not channels_last:
        x = x.contiguous()
    # Strides from the layout, not x.stride(): size-1 dims may carry arbitrary strides.
    stride_n, stride_c, stride_p = (C * pixels, 1, C) if channels_last else (C * pixels, pixels, 1)
    out = new_output(x.shape, like=x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    group_channels = C // num_groups
    block_c = min(64, triton.next_power_of_2(group_channels))
    block_p = max(16, min(triton.next_power_of_2(pixels), 4096 // block_c))
    pixels_per_split = max(block_p, (_ELEMENTS_PER_PROGRAM // group_channels) // block_p * block_p)
    num_splits = triton.cdiv(pixels, pixels_per_split)
    partials = torch.empty((N * num_groups, num_splits, 2), dtype=torch.float32, device=x.device)

    grid = (N * num_groups, num_splits)
    _group_stats_kernel[grid](x, partials, group_channels, pixels, num_groups, pixels_per_split, num_splits,
                              stride_n, stride_c, stride_p, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    _group_norm_apply_kernel[grid](
        x, out, weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x, partials,
        group_channels, pixels, num_groups, pixels_per_split, num_splits, eps,
        stride_n, stride_c, stride_p,
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return out
