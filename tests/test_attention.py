"""attention on the C++ backend (and the reference, as a check of the harness) against the float64 twin.

Shapes: SD1.5 / MobileDiffusion at 512x512 (self attention over 4096 and 1024 tokens with head dims
40, 64, 80; cross attention over 77 text tokens with head dims 40, 80, 160), with fewer heads to keep
the float64 reference quick, plus odd ones: head dims 8, 9 (odd: the bf16 pair tail), 72, 256;
one key; 300 keys (just past the single-pass path); 1000 x 1000; batch 3; 5 queries. Then shared
K/V, ReLU weights, negative scales, strided views of a fused projection (read without copies), a
non-unit last stride, the AVX-512 (no BF16), AVX2 and scalar paths in subprocesses (the SIMD level
is read once per process), and argument errors.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdiff.ops as ops
from helpers import backend_param, check_against_reference, dtypes_for, fused_slot, heads_major

BACKENDS = [backend_param("cpp"), backend_param("reference")]
CPP = [backend_param("cpp")]
DTYPES = dtypes_for("cpp")


def _id(dtype):
    return str(dtype).removeprefix("torch.")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _qkv(B, Lq, Lk, H, D, seed=0):
    return _randn(B, Lq, H, D, seed=seed), _randn(B, Lk, H, D, seed=seed + 1), _randn(B, Lk, H, D, seed=seed + 2)


# (batch, seqlen_q, seqlen_k, heads, headdim)
SHAPES = {
    "sd-self-4096-d40": (2, 4096, 4096, 1, 40),  # SD1.5 64x64 latent level: 8 heads of 40 (1 here)
    "md-self-1024-d64": (2, 1024, 1024, 2, 64),  # MobileDiffusion
    "sd-self-1024-d80": (2, 1024, 1024, 2, 80),  # SD1.5 640 channels
    "sd-cross-4096x77-d40": (2, 4096, 77, 2, 40),  # text cross attention: single pass
    "sd-cross-1024x77-d80": (2, 1024, 77, 2, 80),
    "sd-cross-256x77-d160": (2, 256, 77, 2, 160),
    "self-1000-d72": (1, 1000, 1000, 2, 72),  # nothing a multiple of 16
    "batch3-d80": (3, 33, 20, 2, 80),
    "keys1": (2, 17, 1, 2, 64),
    "keys300-d40": (1, 48, 300, 1, 40),  # one 128-key block too many for the single pass, key tail
    "queries5": (2, 5, 130, 3, 40),
    "d8": (2, 20, 23, 2, 8),
    "d9-odd": (1, 37, 50, 2, 9),
    "d256": (1, 40, 257, 1, 256),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_attention(shape, dtype, backend):
    check_against_reference("attention", _qkv(*shape), {}, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("shape", [(2, 1024, 77, 2, 64), (1, 300, 1000, 2, 64), (1, 40, 301, 1, 9)],
                         ids=["single-pass", "looped", "odd-d-odd-keys"])
def test_attention_shared_kv(shape, kind, dtype, backend):
    q, kv, _ = _qkv(*shape, seed=10)
    check_against_reference("attention", (q, kv, None), {"kind": kind}, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(2, 1024, 1024, 2, 64), (2, 100, 77, 2, 80), (1, 64, 299, 2, 40)],
                         ids=["md-self-1024-d64", "single-pass", "looped-odd-keys"])
def test_attention_relu(shape, dtype, backend):
    check_against_reference("attention", _qkv(*shape, seed=20), {"kind": "relu", "scale": 0.3}, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scale, kind", [(-0.2, "softmax"), (-0.2, "relu"), (0.0, "softmax")])
def test_attention_unusual_scales(scale, kind, dtype, backend):
    """A negative scale flips which key is the max; zero gives uniform softmax weights (and an
    all-zero ReLU output, which a relative error cannot judge, so that one is left out)."""
    check_against_reference("attention", _qkv(1, 50, 300, 2, 40, seed=30), {"kind": kind, "scale": scale}, backend, dtype)




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(2, 45, 45, 2, 40), (1, 70, 300, 2, 72), (1, 33, 33, 2, 9)], ids=["d40", "d72-looped", "d9"])
def test_attention_fused_qkv_views(shape, dtype, backend):
    q, k, v = _qkv(*shape, seed=40)
    slot_of = {id(q): 0, id(k): 1, id(v): 2}
    check_against_reference("attention", (q, k, v), {}, backend, dtype,
                            cast=lambda a, dt, dev: fused_slot(slot_of[id(a)])(a, dt, dev))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_attention_heads_major_views(dtype, backend):
    q, k, _ = _qkv(2, 50, 77, 3, 40, seed=50)
    check_against_reference("attention", (q, k, None), {}, backend, dtype, cast=heads_major)


def _every_other(value, dtype, device):
    """Head dim with stride 2 (NaN in between)."""
    if not isinstance(value, torch.Tensor):
        return value
    wide = torch.full((*value.shape[:-1], 2 * value.shape[-1]), float("nan"), dtype=dtype, device=device)
    wide[..., ::2] = value.to(device=device, dtype=dtype)
    return wide[..., ::2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_attention_non_unit_last_stride(dtype, backend):
    check_against_reference("attention", _qkv(1, 30, 300, 2, 40, seed=60), {}, backend, dtype, cast=_every_other)


def _copies_made(fn):
    """Names of the copying aten ops that fn() runs (the profiler sees every dispatched op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()} & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy"}


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_attention_views_are_not_copied(dtype, backend):
    """Slices of a fused qkv projection go to the kernel as they are, with no aten copy (the
    kernel's own one-pass packing of K/V tiles, e.g. bf16 V pairs, is not a tensor op); a non-unit
    last stride is made contiguous (which shows the probe sees copies made inside the extension)."""
    qkv = torch.randn(2, 300, 3, 2, 40, dtype=dtype)
    q, k, v = qkv.unbind(2)
    with ops.use_backend(backend):
        assert _copies_made(lambda: ops.attention(q, k, v)) == set()
        assert _copies_made(lambda: ops.attention(q, k)) == set()
        strided = torch.randn(2, 30, 2, 80, dtype=dtype)[..., ::2]
        assert _copies_made(lambda: ops.attention(strided, strided, strided)) != set()


_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import sys, torch
    from fastdiff import _C
    from helpers import check_against_reference
    assert _C.simd() == sys.argv[1], f"FASTDIFF_SIMD={sys.argv[1]} gave {_C.simd()}"
    gen = torch.Generator().manual_seed(0)
    for B, Lq, Lk, H, D in [(2, 100, 77, 2, 40), (1, 70, 300, 2, 72), (1, 33, 20, 1, 9), (2, 17, 1, 1, 160)]:
        q, k, v = (torch.randn(B, L, H, D, generator=gen, dtype=torch.float64) for L in (Lq, Lk, Lk))
        for dtype in (torch.float32, torch.bfloat16):
            for kind in ("softmax", "relu"):
                check_against_reference("attention", (q, k, v), {"kind": kind}, "cpp", dtype)
                check_against_reference("attention", (q, k, None), {"kind": kind, "scale": -0.3}, "cpp", dtype)
    print("ok")
    """
)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
def test_attention_simd_fallbacks(level, backend):
    """The other SIMD paths of the same binary: AVX-512 without BF16 (bf16 converted to fp32),
    AVX2 and scalar. Skipped only if this CPU lacks the level."""
    from fastdiff import _C

    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    if order.index(_C.simd()) < order.index(level):
        pytest.skip(f"this CPU tops out at {_C.simd()}")
    env = dict(os.environ, FASTDIFF_SIMD=level, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK, level], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(__file__), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_CALLS = {
    "q-rank": ((_t(2, 10, 40), _t(2, 10, 1, 40)), {}, ValueError, "q"),
    "k-rank": ((_t(2, 10, 1, 40), _t(10, 1, 40)), {}, ValueError, "k"),
    "v-shape": ((_t(2, 10, 1, 40), _t(2, 12, 1, 40), _t(2, 11, 1, 40)), {}, ValueError, "v"),
    "heads": ((_t(2, 10, 2, 40), _t(2, 10, 1, 40)), {}, ValueError, "k"),
    "head-dim": ((_t(2, 10, 1, 40), _t(2, 10, 1, 32)), {}, ValueError, "k"),
    "batch": ((_t(2, 10, 1, 40), _t(3, 10, 1, 40)), {}, ValueError, "k"),
    "mixed-dtypes": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40, dtype=torch.bfloat16)), {}, TypeError, "k"),
    "d-too-small": ((_t(2, 10, 1, 4), _t(2, 10, 1, 4)), {}, ValueError, "head dim"),
    "d-too-large": ((_t(1, 3, 1, 264), _t(1, 3, 1, 264)), {}, ValueError, "head dim"),
    "kind": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40)), {"kind": "sigmoid"}, ValueError, "kind"),
    "scale": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40)), {"scale": "0.1"}, TypeError, "scale"),
    "not-a-tensor": (([[1.0]], _t(2, 10, 1, 40)), {}, TypeError, "q"),
    "int-dtype": ((torch.ones(2, 10, 1, 40, dtype=torch.int32), _t(2, 10, 1, 40)), {}, TypeError, "q"),
}


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_attention_bad_arguments(case, backend):
    args, kwargs, error, name = BAD_CALLS[case]
    with ops.use_backend(backend), pytest.raises(error, match=name):
        ops.attention(*args, **kwargs)


DIRECT_BAD_CALLS = {
    "q-rank": ((_t(2, 10, 40), _t(2, 10, 1, 40), None, 0.1, False), "q: expected a rank-4"),
    "k-heads": ((_t(2, 10, 2, 40), _t(2, 10, 1, 40), None, 0.1, False), "k: expected"),
    "v-shape": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40), _t(2, 9, 1, 40), 0.1, False), "v: expected the shape of k"),
    "v-dtype": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40), _t(2, 10, 1, 40, dtype=torch.bfloat16), 0.1, False), "v: dtype"),
    "k-dtype": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40).double(), None, 0.1, False), "k: expected float32 or bfloat16"),
    "head-dim": ((_t(2, 10, 1, 300), _t(2, 10, 1, 300), None, 0.1, False), "q: head dim"),
    "empty-keys": ((_t(2, 10, 1, 40), _t(2, 0, 1, 40), None, 0.1, False), "sequence lengths"),
    "scale-nan": ((_t(2, 10, 1, 40), _t(2, 10, 1, 40), None, float("nan"), False), "scale"),
}


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("case", list(DIRECT_BAD_CALLS))
def test_attention_direct_bad_arguments(case, backend):
    """fastdiff._C.attention called directly: a RuntimeError naming the argument, never a crash."""
    from fastdiff import _C

    args, message = DIRECT_BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        _C.attention(*args)
