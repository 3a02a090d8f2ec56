"""separable_conv2d (fused depthwise 3x3 + pointwise 1x1) on the C++ backend against the float64
reference twin.

Shapes: MobileDiffusion / SD channel counts 320, 640, 1024 at reduced spatial sizes (the float64
reference conv is slow), odd ones (batch 3, 7x13 maps, 1x1 maps, channels 40 / 72 / 17, C_out != C,
C_out not a multiple of the 32-channel weight panels), with and without biases, in both memory
formats. The output must be channels_last whatever the input layout.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdiff.ops as ops
from helpers import backend_param, check_against_reference, dtypes_for

BACKENDS = ["cpp", "reference"]

CASES = [  # (N, C, H, W, C_out, biases)
    (2, 320, 16, 16, 320, True),
    (2, 640, 8, 8, 640, True),
    (2, 1024, 4, 4, 1024, False),
    (3, 40, 7, 13, 72, True),  # odd everything
    (2, 72, 1, 1, 40, False),  # 1x1 map: only the centre tap
    (1, 17, 5, 3, 33, True),  # C and C_out not multiples of 16
    (1, 64, 2, 9, 100, True),  # 2-row map, C_out tail of 4 past three panels
]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _args(N, C, H, W, C_out, biases, pw_4d=False):
    x = _randn(N, C, H, W, seed=1)
    dw_weight = _randn(C, 1, 3, 3, seed=2) / 3
    pw_weight = _randn(C_out, C, seed=3) / C**0.5
    if pw_4d:
        pw_weight = pw_weight[:, :, None, None]
    dw_bias = _randn(C, seed=4) if biases else None
    pw_bias = _randn(C_out, seed=5) if biases else None
    return x, dw_weight, dw_bias, pw_weight, pw_bias


def _cast_x(memory_format, x_shape):
    def cast(value, dtype, device):
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device=device, dtype=dtype)
        return value.contiguous(memory_format=memory_format) if tuple(value.shape) == x_shape else value

    return cast


def check(case, backend, dtype, memory_format, pw_4d=False):
    args = _args(*case, pw_4d=pw_4d)
    out, _, _ = check_against_reference(
        "separable_conv2d", args, {}, backend, dtype, cast=_cast_x(memory_format, tuple(args[0].shape))
    )
    assert out.is_contiguous(memory_format=torch.channels_last), "output must be channels_last"


def _case_id(case):
    N, C, H, W, C_out, biases = case
    return f"{N}x{C}x{H}x{W}-to{C_out}" + ("" if biases else "-nobias")


@pytest.mark.parametrize("backend", [backend_param(b) for b in BACKENDS])
@pytest.mark.parametrize("dtype", dtypes_for("cpp"), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_separable_conv_matches_reference(case, memory_format, dtype, backend):
    check(case, backend, dtype, memory_format)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_separable_conv_4d_pointwise_weight_and_big_map(backend):
    """(C_out, C, 1, 1) weights through fastdiff.ops; a 64-wide map spans several pixel tiles per row."""
    check((1, 32, 24, 64, 48, True), backend, torch.float32, torch.channels_last, pw_4d=True)


@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_separable_conv_other_simd_levels(level, backend):
    """FASTDIFF_SIMD caps the SIMD level (avx512: bf16 without vdpbf16ps runs the fp32 GEMM)."""
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_separable_conv as t
from fastdiff import _C
assert _C.simd() == {level!r}, _C.simd()
for case in [(2, 64, 8, 8, 64, True), t.CASES[3], t.CASES[4], t.CASES[5]]:
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.channels_last, torch.contiguous_format):
            t.check(case, "cpp", dtype, fmt)
"""
    env = dict(os.environ, FASTDIFF_SIMD=level)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_separable_conv_argument_errors():
    x = torch.randn(1, 8, 5, 5)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(4, 8)
    with pytest.raises(ValueError, match="dw_weight"):
        ops.separable_conv2d(x, torch.randn(8, 1, 5, 5), None, pw, None)
    with pytest.raises(ValueError, match="pw_weight"):
        ops.separable_conv2d(x, dw, None, torch.randn(4, 7), None)
    with pytest.raises(ValueError, match="pw_bias"):
        ops.separable_conv2d(x, dw, None, pw, torch.randn(5))
    with pytest.raises(TypeError, match="pw_weight"):
        ops.separable_conv2d(x, dw, None, pw.bfloat16(), None)
    with pytest.raises(ValueError, match="x: expected a rank-4"):
        ops.separable_conv2d(torch.randn(8, 5, 5), dw, None, pw, None)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_separable_conv_direct_calls_reject_bad_input(backend):
    from fastdiff import _C

    x = torch.randn(1, 8, 5, 5)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(4, 8)
    bad_calls = [
        lambda: _C.separable_conv2d(torch.randn(8, 5, 5), dw, None, pw, None),  # rank
        lambda: _C.separable_conv2d(x, torch.randn(8, 1, 5, 5), None, pw, None),  # kernel size
        lambda: _C.separable_conv2d(x, dw, None, torch.randn(4, 8, 1, 1), None),  # pointwise must be 2-D
        lambda: _C.separable_conv2d(x, dw, None, torch.randn(4, 9), None),
        lambda: _C.separable_conv2d(x, dw, torch.randn(7), pw, None),  # dw_bias length
        lambda: _C.separable_conv2d(x, dw, None, pw, torch.randn(4).bfloat16()),  # mixed dtypes
        lambda: _C.separable_conv2d(x.double(), dw.double(), None, pw.double(), None),  # dtype
        lambda: _C.separable_conv2d(torch.randn(0, 8, 5, 5), dw, None, pw, None),  # empty
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
