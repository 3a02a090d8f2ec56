"""glu (GEGLU / SwiGLU) on the C++ backend against the float64 reference twin.

Shapes: SD1.5's GEGLU (tokens, 2 * 1280) and MobileDiffusion's expansion-6 (tokens, 2 * 3840),
with fewer tokens than the real 4096 / 1024 to keep the float64 reference cheap; odd feature
counts (tails of every vector width), extra leading dims, a single row, and non-contiguous views
(a slice of a wider projection, a transposed batch) read without a copy.
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

SHAPES = [
    (2, 1024, 2 * 1280),  # SD1.5 GEGLU (real: 2 x 4096 tokens at 64x64)
    (2, 256, 2 * 3840),  # MobileDiffusion expansion 6 (real: 2 x 1024 tokens)
    (3, 7, 13, 2 * 72),  # odd leading dims, 72 features
    (5, 2 * 37),  # features % 16 != 0 and % 8 != 0
    (2 * 3,),  # one row of 3
]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _wide_slice(value, dtype, device):
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
    """Last dim with stride 2: the one case the kernel copies."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype).repeat_interleave(2, dim=-1)[..., ::2]


def check(shape, activation, backend, dtype, cast=None):
    h = _randn(*shape, seed=sum(shape)) * 2.5
    out, _, _ = check_against_reference("glu", (h,), {"activation": activation}, backend, dtype, cast=cast)
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", [backend_param(b) for b in BACKENDS])
@pytest.mark.parametrize("dtype", dtypes_for("cpp"), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_glu_matches_reference(shape, activation, dtype, backend):
    check(shape, activation, backend, dtype)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
@pytest.mark.parametrize("dtype", dtypes_for("cpp"), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", [_wide_slice, _transposed, _last_dim_strided], ids=lambda f: f.__name__.strip("_"))
def test_glu_non_contiguous_input(layout, dtype, backend):
    check((4, 9, 2 * 40), "gelu", backend, dtype, cast=layout)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_glu_gelu_tail_is_accurate(backend):
    """Far negative gate values, where 1 + erf(x / sqrt 2) cancels: exact values from math.erfc."""
    import math

    from fastdiff import _C

    gate = torch.linspace(-9.0, 6.0, 3001)
    h = torch.cat([torch.ones_like(gate), gate])[None]
    out = _C.glu(h, True)[0].double()
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
from fastdiff import _C
assert _C.simd() == {level!r}, _C.simd()
for shape in [(2, 64, 2 * 1280), (3, 7, 13, 2 * 72), (5, 2 * 37), (6,)]:
    for dtype in (torch.float32, torch.bfloat16):
        for activation in ("gelu", "silu"):
            t.check(shape, activation, "cpp", dtype)
t.check((4, 9, 2 * 40), "gelu", "cpp", torch.float32, cast=t._wide_slice)
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
    from fastdiff import _C

    bad_calls = [
        lambda: _C.glu(torch.randn(4, 7), True),  # odd last dim
        lambda: _C.glu(torch.randn(4, 0), True),  # empty last dim
        lambda: _C.glu(torch.tensor(1.0), True),  # scalar
        lambda: _C.glu(torch.randn(4, 8).double(), False),  # dtype
        lambda: _C.glu(torch.randn(4, 8).half(), False),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()
