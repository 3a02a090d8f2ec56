"""glu (GEGLU / SwiGLU) on every backend against its float64 twin, at the shapes of fastdiff.shapes.

Backends: C++ and the reference (a check of the harness) at the table's QUICK size; Triton at TINY
size (without CUDA in its CPU interpreter, which computes this dot-free kernel right in bf16 too);
"triton-full", the real sizes, on a CUDA device only. Shapes: every glu case of the table (SD1.5's
GEGLU, InstructPix2Pix's, MobileDiffusion's expansion-6 SwiGLU; odd feature counts that leave tails
of every vector width, extra leading dims, one row), each with both activations, inputs scaled by
2.5 to reach GELU's tails. Then non-contiguous views (a slice of a wider projection, a transposed
batch: read without a copy), GELU's far tail, the AVX2 and scalar paths in subprocesses, errors.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import cpp_build
from fastdiff.shapes import ODD, TINY, case, cases
from helpers import HAS_CUDA, backend_param, case_params, check_case, runs

RUNS = runs("cpp", "reference", "triton", "triton-full", dot_free=True)


def wide_slice(value, dtype, device):
    """h as columns [8, 8 + 2F) of a wider NaN-padded buffer: rows strided, last dim unit-stride."""
    if not isinstance(value, torch.Tensor):
        return value
    wide = torch.full((*value.shape[:-1], value.shape[-1] + 24), float("nan"), dtype=dtype, device=device)
    wide[..., 8 : 8 + value.shape[-1]] = value.to(device=device, dtype=dtype)
    return wide[..., 8 : 8 + value.shape[-1]]


def _transposed(value, dtype, device):
    """(B, L, 2F) view of (L, B, 2F) storage."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)


def _last_dim_strided(value, dtype, device):
    """Last dim with stride 2: the one case the kernels copy."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype).repeat_interleave(2, dim=-1)[..., ::2]


def check(case, run, activation, cast=None):
    (h,), _ = case.inputs()
    out, _, _ = check_case(case, run, args=(h * 2.5,), cast=cast, activation=activation)
    assert out.is_contiguous()


# The models' cases with their own activation, the odd ones with both.
@pytest.mark.parametrize("case, run, activation", [
    pytest.param(*p.values, activation, id=f"{p.id}-{activation}", marks=p.marks)
    for p in case_params(cases("glu"), RUNS) for activation in ("gelu", "silu")
    if p.values[0].model == ODD or p.values[0].activation == activation])
def test_glu_matches_reference(case, run, activation):
    if run.backend == "triton" and run.dtype == torch.bfloat16 and not HAS_CUDA and case.features < 8:
        pytest.skip("Triton's interpreter rounds to bf16 toward zero (up to 1 ulp): on a few outputs that alone "
                    "can pass the bf16 bound; a GPU rounds to nearest")
    check(case, run, activation)


@pytest.mark.parametrize("layout", [wide_slice, _transposed, _last_dim_strided], ids=lambda f: f.__name__.strip("_"))
# Not the reference: its a * act(gate) follows the input's layout, the kernels return contiguous outputs.
@pytest.mark.parametrize("case, run", case_params([case("glu", "4x9-f40")], runs("cpp", "triton", dot_free=True, size=TINY)))
def test_glu_non_contiguous_input(case, run, layout):
    check(case, run, "gelu", cast=layout)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_glu_gelu_tail_is_accurate(backend):
    """Far negative gate values, where 1 + erf(x / sqrt 2) cancels: exact values from math.erfc."""
    import math

    gate = torch.linspace(-9.0, 6.0, 3001)
    h = torch.cat([torch.ones_like(gate), gate])[None]
    with ops.use_backend(backend):
        out = ops.glu(h, activation="gelu")[0].double()
    exact = torch.tensor([g * 0.5 * math.erfc(-g / math.sqrt(2.0)) for g in gate.double().tolist()], dtype=torch.float64)
    worst = ((out - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert worst < 5e-6, f"max relative error {worst:.2e} of GELU on [-9, 6]"


@pytest.mark.parametrize("level", ["avx2", "scalar"])
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_glu_other_simd_levels(level, backend):
    """FASTDIFF_SIMD caps the SIMD level; the capped paths must match the reference too."""
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_glu as t
from fastdiff import ops
from fastdiff.shapes import TINY, case
from helpers import Run
assert ops.cpp_simd_level() == {level!r}, ops.cpp_simd_level()
for name in ["sd15-geglu-64x64", "3x7x13-f72", "5-f37", "f3"]:
    c = case("glu", name, size=TINY)
    for dtype in (torch.float32, torch.bfloat16):
        for activation in ("gelu", "silu"):
            t.check(c, Run("cpp", dtype, TINY, ""), activation)
t.check(case("glu", "4x9-f40"), Run("cpp", torch.float32, TINY, ""), "gelu", cast=t.wide_slice)
"""
    env = dict(os.environ, FASTDIFF_SIMD=level)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_glu_argument_errors():
    with pytest.raises(ValueError, match="h: expected a last dimension of even"):
        ops.glu(torch.randn(4, 7))
    with pytest.raises(ValueError, match="activation"):
        ops.glu(torch.randn(4, 8), activation="relu")
    with pytest.raises(TypeError, match="h"):
        ops.glu(torch.randn(4, 8).long())
    with pytest.raises(TypeError, match="h"):
        ops.glu([1.0, 2.0])


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_glu_direct_calls_reject_bad_input(backend):
    extension = cpp_build.load()

    bad_calls = [
        lambda: extension.glu(torch.randn(4, 7), True),  # odd last dim
        lambda: extension.glu(torch.randn(4, 0), True),  # empty last dim
        lambda: extension.glu(torch.tensor(1.0), True),  # scalar
        lambda: extension.glu(torch.randn(4, 8).double(), False),  # dtype
        lambda: extension.glu(torch.randn(4, 8).half(), False),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
