"""group_norm (+ fused SiLU) on every backend against its float64 twin, at the shapes of fastdiff.shapes.

Backends: C++ and the reference (a check of the harness) at the table's QUICK size; Triton at TINY
size (without CUDA in its CPU interpreter, which computes this dot-free kernel right in bf16 too);
"triton-full", the real sizes, on a CUDA device only. Shapes: every group_norm case of the table
(SD1.5 / InstructPix2Pix / MobileDiffusion resnet and transformer norms, the VAE decoder's; odd ones:
batch 3, 7x13 and 1x1 maps, channels off 16, 2 and 80 channels per group, no affine) in both memory
formats. Then inputs with a large mean (randn + 30, -50, 300), which break E[x^2] - E[x]^2
statistics, groups of zero or tiny variance at an offset (constant 0.5, 0.5 + tiny noise), a
non-contiguous input, the AVX2 and scalar paths in subprocesses, argument errors.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import cpp_build
from fastdiff.shapes import TINY, case, cases, model_cases
from helpers import backend_param, case_params, check_case, layout_cast, runs

RUNS = runs("cpp", "reference", "triton", "triton-full", dot_free=True)
# Triton's CPU interpreter takes ~25 ms per program: without CUDA it runs the odd cases (2 to 80 channels
# per group, several splits, 1x1 maps, no affine); the models' cases run on a GPU only.
GPU_ONLY_ON_TRITON = {c.name for c in model_cases("group_norm")}
FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="nhwc")]


def check(case, run, memory_format, args=None):
    out, _, _ = check_case(case, run, args=args, cast=layout_cast(memory_format))
    assert out.is_contiguous(memory_format=memory_format), "output must keep x's memory format"


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("case, run", case_params(cases("group_norm"), RUNS, gpu_only_on_triton=GPU_ONLY_ON_TRITON))
def test_group_norm_matches_reference(case, run, memory_format):
    check(case, run, memory_format)


MEANS = {"sd15-320x64x64": 30.0, "1x96x9x5-g3-noaffine": -50.0, "1x160x12x12-g2": 300.0}


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("case, run", case_params([case("group_norm", name) for name in MEANS],
                                                  runs("cpp", "reference", "triton", dot_free=True),
                                                  gpu_only_on_triton=GPU_ONLY_ON_TRITON))
def test_group_norm_large_mean(case, run, memory_format):
    """|mean| up to 300 x std: fp32 statistics must not lose the variance to cancellation (Triton:
    also across the splits of a group)."""
    x, *rest = case.inputs()[0]
    check(case, run, memory_format, args=(x + MEANS[case.name], *rest))


# Spread of the near-constant groups: ~170 fp32 ulps of 0.5; in bf16 a few ulps (less rounds to 0.5).
SPREAD = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("pattern", ["mixed", "all-flat"])
@pytest.mark.parametrize("case, run", case_params([case("group_norm", name) for name in ("sd15-320x64x64", "1x96x9x5-g3-noaffine")],
                                                  runs("cpp", "reference")))
def test_group_norm_zero_variance_groups(case, run, memory_format, pattern):
    """Groups whose spread vanishes against their mean (issue 18: torch's fp32 F.group_norm, the
    reference backend's twin until then, was 1e-3 off on channels_last input). "mixed": every third
    group exactly 0.5 (zero variance), every third 0.5 + tiny noise, the rest randn; "all-flat":
    every group 0.5 + tiny noise, so the output is that noise normalized, with no large values to
    hide an error in."""
    x, groups, *rest = case.inputs()[0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    near = 0.5 + SPREAD[run.dtype] * noise
    if pattern == "mixed":
        by_group = lambda t: t.view(x.shape[0], groups, -1)  # noqa: E731
        x = x.clone()
        by_group(x)[:, 0::3] = 0.5
        by_group(x)[:, 1::3] = by_group(near)[:, 1::3]
    else:
        x = near
    check(case, run, memory_format, args=(x, groups, *rest))


@pytest.mark.parametrize("run", runs("cpp", "reference", "triton", dot_free=True, size=TINY))
def test_group_norm_non_contiguous_input(run):
    """Every other row of x (a strided view), weight without bias."""
    c = case("group_norm", "2x64x9x13-g32", size=run.size)
    x, groups, weight, _, eps = c.inputs()[0]
    cast = lambda v, dtype, device: v.to(device=device, dtype=dtype)[:, :, ::2] if isinstance(v, torch.Tensor) and v.dim() == 4 else (  # noqa: E731
        v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
    check_case(c, run, args=(x, groups, weight, None, eps), cast=cast)


@pytest.mark.parametrize("level", ["avx2", "scalar"])
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_group_norm_other_simd_levels(level, backend):
    """FASTDIFF_SIMD caps the SIMD level; the capped paths must match the reference too."""
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_group_norm as t
from fastdiff import ops
from fastdiff.shapes import QUICK, case
from helpers import Run
assert ops.cpp_simd_level() == {level!r}, ops.cpp_simd_level()
for name, mean in [("3x40x7x13-g8", 0.0), ("2x72x1x1-g8-noaffine", 0.0), ("sd15-1280x8x8", 0.0), ("sd15-1280x8x8", 30.0)]:
    c = case("group_norm", name, size=QUICK)
    x, *rest = c.inputs()[0]
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            t.check(c, Run("cpp", dtype, QUICK, ""), fmt, args=(x + mean, *rest))
"""
    env = dict(os.environ, FASTDIFF_SIMD=level)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_group_norm_argument_errors():
    x = torch.randn(2, 32, 4, 4)
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm(x, 5, None, None)
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm(x, 8, torch.randn(16), None)
    with pytest.raises(TypeError, match="bias"):
        ops.group_norm(x, 8, None, torch.randn(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x: expected a rank-4"):
        ops.group_norm(torch.randn(2, 32, 16), 8, None, None)
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm(x, 8, None, None, eps=0.0)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_group_norm_direct_calls_reject_bad_input(backend):
    extension = cpp_build.load()

    x = torch.randn(2, 32, 4, 4)
    bad_calls = [
        lambda: extension.group_norm(torch.randn(2, 32, 16), 8, None, None, 1e-5, False),  # rank
        lambda: extension.group_norm(x, 5, None, None, 1e-5, False),  # groups do not divide C
        lambda: extension.group_norm(x, 0, None, None, 1e-5, False),
        lambda: extension.group_norm(x, 8, torch.randn(31), None, 1e-5, False),  # weight length
        lambda: extension.group_norm(x, 8, None, torch.randn(32).double(), 1e-5, False),  # bias dtype
        lambda: extension.group_norm(x.half(), 8, None, None, 1e-5, False),  # dtype
        lambda: extension.group_norm(torch.randn(0, 32, 4, 4), 8, None, None, 1e-5, False),  # empty
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
