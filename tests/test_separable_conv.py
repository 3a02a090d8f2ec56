"""separable_conv2d (fused depthwise 3x3 + pointwise 1x1) on every backend against its float64 twin,
at the shapes of fastdiff.shapes.

Backends: C++ and the reference (a check of the harness) at the table's QUICK size; Triton at TINY
size (without CUDA in its CPU interpreter, fp32/fp16 only: the interpreter computes bf16 tl.dot
wrongly); "triton-full", the real sizes, on a CUDA device only. Shapes: every separable_conv2d case
of the table (MobileDiffusion's resnets, C -> C and C -> C_out; odd ones: batch 3, 7x13 and 1x1
maps, channels 17 / 40 / 70 / 72, C_out not a multiple of the 32-channel weight panels or of
Triton's blocks, with and without biases) in both memory formats; the output must be channels_last
whatever the input layout. Then the pointwise weight as a 2-D matrix, the AVX-512 (no BF16), AVX2
and scalar paths in subprocesses, argument errors.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import cpp_build
from fastdiff.shapes import case, cases, model_cases
from helpers import backend_param, case_params, check_case, layout_cast, runs

RUNS = runs("cpp", "reference", "triton", "triton-full")
# Triton's CPU interpreter takes ~0.2 s per 16 input channels of a 64-pixel tile: without CUDA it runs the
# odd cases (C > C_out and C < C_out, tails of every block, several tiles) and one model case; the rest
# run on a GPU only.
GPU_ONLY_ON_TRITON = {c.name for c in model_cases("separable_conv2d")} - {"md-320to640-32x32"} | {"3x40x7x13-to72", "2x72x1x1-to40-nobias"}
FORMATS = [pytest.param(torch.channels_last, id="nhwc"), pytest.param(torch.contiguous_format, id="nchw")]


def check(case, run, memory_format, pw_2d=False):
    args, _ = case.inputs()
    if pw_2d:  # (C_out, C) instead of nn.Conv2d's (C_out, C, 1, 1)
        x, dw_weight, dw_bias, pw_weight, pw_bias = args
        args = (x, dw_weight, dw_bias, pw_weight[:, :, 0, 0], pw_bias)
    out, _, _ = check_case(case, run, args=args, cast=layout_cast(memory_format))
    assert out.is_contiguous(memory_format=torch.channels_last), "output must be channels_last"


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("case, run", case_params(cases("separable_conv2d"), RUNS, gpu_only_on_triton=GPU_ONLY_ON_TRITON))
def test_separable_conv_matches_reference(case, run, memory_format):
    check(case, run, memory_format)


@pytest.mark.parametrize("case, run", case_params([case("separable_conv2d", n) for n in ("1x24x6x10-to40", "1x32x24x64-to48")],
                                                  runs("cpp", "reference", "triton")))
def test_separable_conv_2d_pointwise_weight(case, run):
    """(C_out, C) pointwise weights through fastdiff.ops; a 64-wide map spans several pixel tiles per row."""
    check(case, run, torch.channels_last, pw_2d=True)


@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_separable_conv_other_simd_levels(level, backend):
    """FASTDIFF_SIMD caps the SIMD level (avx512: bf16 without vdpbf16ps runs the fp32 GEMM).
    Skipped only if this CPU lacks the level."""
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    if order.index(ops.cpp_simd_level()) < order.index(level):
        pytest.skip(f"this CPU tops out at {ops.cpp_simd_level()}")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_separable_conv as t
from fastdiff import ops
from fastdiff.shapes import QUICK, TINY, case
from helpers import Run
assert ops.cpp_simd_level() == {level!r}, ops.cpp_simd_level()
for name, size in [("md-640x32x32", TINY), ("3x40x7x13-to72", QUICK), ("2x72x1x1-to40-nobias", QUICK), ("1x17x5x3-to33", QUICK)]:
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.channels_last, torch.contiguous_format):
            t.check(case("separable_conv2d", name, size=size), Run("cpp", dtype, size, ""), fmt)
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
    extension = cpp_build.load()

    x = torch.randn(1, 8, 5, 5)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(4, 8)
    bad_calls = [
        lambda: extension.separable_conv2d(torch.randn(8, 5, 5), dw, None, pw, None),  # rank
        lambda: extension.separable_conv2d(x, torch.randn(8, 1, 5, 5), None, pw, None),  # kernel size
        lambda: extension.separable_conv2d(x, dw, None, torch.randn(4, 8, 1, 1), None),  # pointwise must be 2-D
        lambda: extension.separable_conv2d(x, dw, None, torch.randn(4, 9), None),
        lambda: extension.separable_conv2d(x, dw, torch.randn(7), pw, None),  # dw_bias length
        lambda: extension.separable_conv2d(x, dw, None, pw, torch.randn(4).bfloat16()),  # mixed dtypes
        lambda: extension.separable_conv2d(x.double(), dw.double(), None, pw.double(), None),  # dtype
        lambda: extension.separable_conv2d(torch.randn(0, 8, 5, 5), dw, None, pw, None),  # empty
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
