"""Triton kernels (kernels/) against the reference twins, through fastdiff.ops on the triton backend.

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so these sizes are reduced versions of the real ones that keep every code path busy: head dims
padded in registers (8, 40, 72, 80, 160), key tails, the single-pass and the looped attention paths,
several group-norm splits and channel blocks, several pointwise output/input channel blocks.
The `gpu` set at the end runs SD1.5 / MobileDiffusion sizes and needs a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from helpers import HAS_CUDA, backend_param, check_against_reference, dtypes_for, fused_slot, heads_major, layout_cast

TRITON = [backend_param("triton")]
DTYPES = dtypes_for("triton")
# group_norm and glu use no tl.dot, so the interpreter computes them correctly in bf16 as well.
DOT_FREE_DTYPES = DTYPES if torch.bfloat16 in DTYPES else DTYPES + [torch.bfloat16]


def gpu_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="real sizes need a CUDA device")(test))


def _id(dtype):
    return str(dtype).removeprefix("torch.")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)





def _assert_layout(out, memory_format):
    expected = torch.empty(out.shape, device="meta", memory_format=memory_format).stride()
    assert out.stride() == expected, f"output strides {out.stride()}, expected {expected} ({memory_format})"


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, heads, headdim)
ATTENTION_SHAPES = {
    "self-130-d40": (2, 130, 130, 2, 40),  # SD1.5 level-1 head dim, one 256-key block
    "self-130-d64": (1, 130, 130, 2, 64),
    "self-130-d72": (1, 130, 130, 1, 72),  # padded to 128 -> looped path
    "self-130-d80": (1, 130, 130, 2, 80),
    "self-130-d160": (1, 130, 130, 1, 160),  # padded to 256
    "cross-77-d40": (1, 100, 77, 2, 40),  # text cross attention, single pass
    "cross-77-d160": (1, 100, 77, 1, 160),  # same, looped (tile too big for one pass)
    "batch3-d80": (3, 33, 20, 2, 80),
    "keys1": (2, 17, 1, 2, 64),
    "keys300-d40": (1, 48, 300, 1, 40),  # > 256 keys: looped path with a key tail
    "d8": (2, 20, 23, 2, 8),  # padded to the 16 tl.dot needs
}


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
def test_attention(shape, dtype, backend):
    B, Lq, Lk, H, D = shape
    q, k, v = _randn(B, Lq, H, D, seed=1), _randn(B, Lk, H, D, seed=2), _randn(B, Lk, H, D, seed=3)
    check_against_reference("attention", (q, k, v), {}, backend, dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("shape", [(2, 70, 70, 2, 40), (1, 40, 300, 1, 72)], ids=["single-pass", "looped"])
def test_attention_shared_kv(shape, kind, dtype, backend):
    B, Lq, Lk, H, D = shape
    q, kv = _randn(B, Lq, H, D, seed=4), _randn(B, Lk, H, D, seed=5)
    check_against_reference("attention", (q, kv, None), {"kind": kind}, backend, dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(2, 100, 77, 2, 80), (1, 64, 300, 2, 40)], ids=["single-pass", "looped"])
def test_attention_relu(shape, dtype, backend):
    B, Lq, Lk, H, D = shape
    q, k, v = _randn(B, Lq, H, D, seed=6), _randn(B, Lk, H, D, seed=7), _randn(B, Lk, H, D, seed=8)
    check_against_reference("attention", (q, k, v), {"kind": "relu", "scale": 0.3}, backend, dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("D", [40, 72])
def test_attention_fused_qkv_views(D, dtype, backend):
    """q, k, v as strided slices of one fused projection; the head-dim padding must stay masked."""
    q, k, v = _randn(2, 45, 2, D, seed=9), _randn(2, 45, 2, D, seed=10), _randn(2, 45, 2, D, seed=11)
    slot_of = {id(q): 0, id(k): 1, id(v): 2}
    check_against_reference("attention", (q, k, v), {}, backend, dtype,
                            cast=lambda a, dt, dev: fused_slot(slot_of[id(a)])(a, dt, dev))


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_attention_heads_major_views(dtype, backend):
    q, k = _randn(2, 50, 3, 40, seed=12), _randn(2, 77, 3, 40, seed=13)
    check_against_reference("attention", (q, k, None), {}, backend, dtype, cast=heads_major)


@pytest.mark.parametrize("backend", TRITON)
def test_attention_non_unit_last_stride(backend):
    """A head dim with stride 2 is copied to a contiguous layout first, and still computes right."""

    def every_other(value, dtype, device):
        if not isinstance(value, torch.Tensor):
            return value
        wide = torch.full((*value.shape[:-1], 2 * value.shape[-1]), float("nan"), dtype=dtype, device=device)
        wide[..., ::2] = value.to(device=device, dtype=dtype)
        return wide[..., ::2]

    q, k, v = _randn(1, 30, 2, 40, seed=14), _randn(1, 30, 2, 40, seed=15), _randn(1, 30, 2, 40, seed=16)
    check_against_reference("attention", (q, k, v), {}, backend, torch.float32, cast=every_other)


# ---------------------------------------------------------------------------------------------
# group norm
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (shape, groups, silu, layout name)
GROUP_NORM_CASES = {
    "2x64x9x13-g32-silu-nchw": ((2, 64, 9, 13), 32, True, "nchw"),  # SD's 32 groups, 2 channels each
    "2x64x9x13-g32-silu-cl": ((2, 64, 9, 13), 32, True, "channels_last"),
    "2x64x9x13-g32-plain-cl": ((2, 64, 9, 13), 32, False, "channels_last"),
    "1x160x24x24-g2-silu-nchw": ((1, 160, 24, 24), 2, True, "nchw"),  # 80 channels/group (2 blocks), 9 splits
    "1x160x24x24-g2-plain-cl": ((1, 160, 24, 24), 2, False, "channels_last"),
    "3x40x5x7-g8-silu-cl": ((3, 40, 5, 7), 8, True, "channels_last"),  # batch 3, 5 channels per group
}


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DOT_FREE_DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(GROUP_NORM_CASES.values()), ids=list(GROUP_NORM_CASES))
def test_group_norm(case, dtype, backend):
    shape, groups, silu, layout = case
    x, w, b = _randn(*shape, seed=20), _randn(shape[1], seed=21), _randn(shape[1], seed=22)
    out, _, _ = check_against_reference("group_norm", (x, groups, w, b), {"silu": silu}, backend, dtype, cast=layout_cast(LAYOUTS[layout]))
    _assert_layout(out, LAYOUTS[layout])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DOT_FREE_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_group_norm_no_affine(layout, dtype, backend):
    x = _randn(2, 48, 6, 11, seed=23)
    check_against_reference("group_norm", (x, 16, None, None), {"eps": 1e-6}, backend, dtype, cast=layout_cast(layout))


@pytest.mark.parametrize("backend", TRITON)
def test_group_norm_large_mean(backend):
    """|mean| = 300 × std: fp32 statistics must not lose the variance to cancellation."""
    x = _randn(2, 64, 20, 20, seed=24) + 300.0
    w, b = _randn(64, seed=25), _randn(64, seed=26)
    check_against_reference("group_norm", (x, 32, w, b), {}, backend, torch.float32)


# ---------------------------------------------------------------------------------------------
# GLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DOT_FREE_DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("shape", [(3, 37, 2 * 96), (4, 2 * 1280), (2 * 24,)], ids=["3x37x96", "4x1280", "1d-24"])
def test_glu(shape, activation, dtype, backend):
    check_against_reference("glu", (_randn(*shape, seed=30) * 2,), {"activation": activation}, backend, dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DOT_FREE_DTYPES, ids=_id)
def test_glu_strided_rows(dtype, backend):
    """Rows of h padded in memory (a slice of a wider buffer) are read through their stride."""

    def row_slice(value, dtype, device):
        wide = torch.full((value.shape[0], value.shape[1] + 10), float("nan"), dtype=dtype, device=device)
        wide[:, : value.shape[1]] = value.to(device=device, dtype=dtype)
        return wide[:, : value.shape[1]]

    check_against_reference("glu", (_randn(21, 2 * 50, seed=31),), {}, backend, dtype, cast=row_slice)


# ---------------------------------------------------------------------------------------------
# separable conv
# ---------------------------------------------------------------------------------------------

# (shape, out_channels, bias, layout name)
SEPARABLE_CASES = {
    "2x40x7x13-to24-bias-nchw": ((2, 40, 7, 13), 24, True, "nchw"),
    "2x40x7x13-to24-bias-cl": ((2, 40, 7, 13), 24, True, "channels_last"),
    "2x40x7x13-to24-nobias-nchw": ((2, 40, 7, 13), 24, False, "nchw"),
    "2x40x7x13-to24-nobias-cl": ((2, 40, 7, 13), 24, False, "channels_last"),
    "1x70x5x6-to150-bias-cl": ((1, 70, 5, 6), 150, True, "channels_last"),  # 3 output-channel blocks, input tail
    "3x16x9x9-to16-nobias-nchw": ((3, 16, 9, 9), 16, False, "nchw"),  # batch 3, exact 16-channel blocks
}


def _separable_args(shape, out_channels, *, bias, pw_2d=False, seed=40):
    C = shape[1]
    x = _randn(*shape, seed=seed)
    dw_w = _randn(C, 1, 3, 3, seed=seed + 1) / 3
    dw_b = _randn(C, seed=seed + 2) if bias else None
    pw_w = _randn(out_channels, C, *(() if pw_2d else (1, 1)), seed=seed + 3) / C**0.5
    pw_b = _randn(out_channels, seed=seed + 4) if bias else None
    return x, dw_w, dw_b, pw_w, pw_b


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(SEPARABLE_CASES.values()), ids=list(SEPARABLE_CASES))
def test_separable_conv2d(case, dtype, backend):
    shape, out_channels, bias, layout = case
    args = _separable_args(shape, out_channels, bias=bias)
    out, _, _ = check_against_reference("separable_conv2d", args, {}, backend, dtype, cast=layout_cast(LAYOUTS[layout]))
    _assert_layout(out, torch.channels_last)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_separable_conv2d_2d_pointwise_weight(dtype, backend):
    args = _separable_args((1, 24, 6, 10), 40, bias=True, pw_2d=True, seed=50)
    check_against_reference("separable_conv2d", args, {}, backend, dtype)


# ---------------------------------------------------------------------------------------------
# Real sizes, CUDA only (SD1.5 at 512×512: 64×64 latents, heads of 40/80/160; MobileDiffusion
# separable convs at 320/640/1024 channels)
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_ATTENTION = {
    "self-4096-d40": ((2, 4096, 4096, 8, 40), "softmax", False),
    "self-1024-d80": ((2, 1024, 1024, 8, 80), "softmax", False),
    "self-256-d160": ((2, 256, 256, 8, 160), "softmax", False),
    "cross-4096x77-d40": ((2, 4096, 77, 8, 40), "softmax", False),
    "cross-256x77-d160": ((2, 256, 77, 8, 160), "softmax", False),
    "relu-shared-1024-d64": ((2, 1024, 1024, 10, 64), "relu", True),
}


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(GPU_ATTENTION.values()), ids=list(GPU_ATTENTION))
@pytest.mark.parametrize("backend", TRITON)
@gpu_only
def test_gpu_attention(case, dtype, backend):
    (B, Lq, Lk, H, D), kind, shared = case
    q, k, v = _randn(B, Lq, H, D, seed=60), _randn(B, Lk, H, D, seed=61), _randn(B, Lk, H, D, seed=62)
    check_against_reference("attention", (q, k, None if shared else v), {"kind": kind}, backend, dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 128, 512, 512)], ids=["2x320x64x64", "2x1280x8x8", "vae-1x128x512x512"])
@pytest.mark.parametrize("backend", TRITON)
@gpu_only
def test_gpu_group_norm(shape, layout, dtype, backend):
    x, w, b = _randn(*shape, seed=70), _randn(shape[1], seed=71), _randn(shape[1], seed=72)
    out, _, _ = check_against_reference("group_norm", (x, 32, w, b), {"silu": True}, backend, dtype, cast=layout_cast(layout))
    _assert_layout(out, layout)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("backend", TRITON)
@gpu_only
def test_gpu_glu(activation, dtype, backend):
    check_against_reference("glu", (_randn(2, 4096, 2 * 1280, seed=80),), {"activation": activation}, backend, dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_id)
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("case", [((2, 320, 64, 64), 320), ((2, 640, 32, 32), 640), ((2, 1024, 16, 16), 1024)],
                         ids=["320ch-64x64", "640ch-32x32", "1024ch-16x16"])
@pytest.mark.parametrize("backend", TRITON)
@gpu_only
def test_gpu_separable_conv2d(case, layout, dtype, backend):
    shape, out_channels = case
    args = _separable_args(shape, out_channels, bias=True, seed=90)
    out, _, _ = check_against_reference("separable_conv2d", args, {}, backend, dtype, cast=layout_cast(layout))
    _assert_layout(out, torch.channels_last)
