# Separable convolution, fused: depthwise 3×3 (stride 1, zero padding 1, + dw_bias) then
# pointwise 1×1 (+ pw_bias), output (N, C_out, H, W) in channels_last memory.
#
# One program per (BLOCK_P pixels, BLOCK_CO output channels). It loops over BLOCK_CI input
# channels at a time: the 9 taps of the depthwise conv for those channels are gathered and summed
# in fp32 registers, rounded to the input dtype (as a torch depthwise conv would store it), and
# multiplied straight into the output tile with tl.dot against the (BLOCK_CI, BLOCK_CO) pointwise
# block. The depthwise result never reaches memory.
# Memory traffic: x read ceil(C_out / BLOCK_CO) times (the 9 taps of neighbouring pixels hit in
# L1/L2; program order puts the output-channel blocks of one pixel tile next to each other),
# weights read once per pixel tile (L2-resident), output written once.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output


@triton.jit
def _separable_conv_kernel(
    x_ptr, dw_weight_ptr, dw_bias_ptr, pw_weight_ptr, pw_bias_ptr, out_ptr,
    channels, out_channels, height, width, num_pixels,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_pw_out, stride_pw_in,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr, HAS_PW_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    co_ok = co < out_channels
    pix_ok = pix < num_pixels
    plane = height * width
    n = pix // plane
    h = (pix % plane) // width
    w = pix % width
    x_image = x_ptr + n.to(tl.int64) * stride_xn

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_CI):
        ci = c0 + tl.arange(0, BLOCK_CI)
        ci_ok = ci < channels
        x_chan = x_image[:, None] + ci[None, :] * stride_xc
        depthwise = tl.zeros((BLOCK_P, BLOCK_CI), dtype=tl.float32)
        for tap in tl.static_range(9):
            hh = h + (tap // 3 - 1)
            ww = w + (tap % 3 - 1)
            inside = pix_ok & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)  # zero padding
            x = tl.load(x_chan + (hh * stride_xh + ww * stride_xw)[:, None], mask=inside[:, None] & ci_ok[None, :], other=0.0)
            tap_weight = tl.load(dw_weight_ptr + ci * 9 + tap, mask=ci_ok, other=0.0)
            depthwise += x.to(tl.float32) * tap_weight.to(tl.float32)[None, :]
        if HAS_DW_BIAS:
            depthwise += tl.load(dw_bias_ptr + ci, mask=ci_ok, other=0.0).to(tl.float32)[None, :]
        # Channels past C have zero pointwise weights, so their depthwise values drop out.
        pw = tl.load(pw_weight_ptr + co[None, :] * stride_pw_out + ci[:, None] * stride_pw_in,
                     mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(depthwise.to(pw.dtype), pw, acc, input_precision=DOT_PRECISION)
    if HAS_PW_BIAS:
        acc += tl.load(pw_bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    # channels_last output: element (n, co, h, w) sits at pixel_index · C_out + co.
    out = out_ptr + pix.to(tl.int64)[:, None] * out_channels + co[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pix_ok[:, None] & co_ok[None, :])


def separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias):
    N, C, H, W = x.shape
    out_channels = pw_weight.shape[0]
    pw = pw_weight.reshape(out_channels, C)
    dw_weight = dw_weight.contiguous()  # (C, 1, 3, 3): 9 taps per channel, C·9 elements
    out = new_output((N, out_channels, H, W), like=x, memory_format=torch.channels_last)

    num_pixels = N * H * W
    # H100 (sm_90 compile checked, no spills): 64 pixels × up to 128 output channels, 8 warps;
    # 64 output channels when fewer than ~2 programs per SM would run otherwise.
    block_p = 64
    block_co = min(128, max(16, triton.next_power_of_2(out_channels)))
    if block_co == 128 and triton.cdiv(num_pixels, block_p) * triton.cdiv(out_channels, 128) < 264:
        block_co = 64
    block_ci = 32 if x.dtype != torch.float32 else 16  # fp32 ieee dots keep operands in registers
    grid = (triton.cdiv(out_channels, block_co), triton.cdiv(num_pixels, block_p))
    _separable_conv_kernel[grid](
        x, dw_weight, dw_bias.contiguous() if dw_bias is not None else dw_weight, pw,
        pw_bias.contiguous() if pw_bias is not None else pw, out,
        C, out_channels, H, W, num_pixels,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        pw.stride(0), pw.stride(1),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        HAS_DW_BIAS=dw_bias is not None, HAS_PW_BIAS=pw_bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=8, num_stages=2,
    )
    return out
