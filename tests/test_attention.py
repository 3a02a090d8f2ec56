"""attention on every backend against its float64 twin, at the shapes of fastdiff.shapes.

Backends: C++ and the reference (a check of the harness) at the table's QUICK size; Triton at TINY
size (without CUDA in its CPU interpreter, fp32/fp16 only: the interpreter computes bf16 tl.dot
wrongly); and "triton-full", the real sizes, on a CUDA device only. Shapes: every attention case of
the table (SD1.5, InstructPix2Pix, MobileDiffusion; odd head dims 8/9/72/256, lengths off 16, one
key, batch 3). Then, on cases picked from the table: shared K/V and ReLU weights on the single-pass
and looped paths, non-default and negative scales, strided views of a fused projection (read
without copies on the C++ backend), a non-unit last stride, the AVX-512 (no BF16), AVX2 and scalar
paths in subprocesses (the SIMD level is read once per process), and argument errors.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import cpp_build
from fastdiff.shapes import TINY, case, cases, model_cases
from helpers import backend_param, case_params, check_case, fused_slot, heads_major, runs

RUNS = runs("cpp", "reference", "triton", "triton-full")
# Triton's CPU interpreter takes ~10 ms per key block: without CUDA it runs the odd cases and these model
# cases (head dims 64/80/160 on the looped paths, shared K/V, ReLU); the others run on a GPU only.
GPU_ONLY_ON_TRITON = {c.name for c in model_cases("attention")} - {"sd15-self-32x32", "sd15-cross-16x16", "md-self-16x16",
                                                                   "md-relu-self-32x32"}
SCENARIO_RUNS = runs("cpp", "reference", "triton", size=TINY)  # layouts and options: small shapes do
CPP = [backend_param("cpp")]


def _picked(*names):
    return [case("attention", name) for name in names]


@pytest.mark.parametrize("case, run", case_params(cases("attention"), RUNS, gpu_only_on_triton=GPU_ONLY_ON_TRITON))
def test_attention(case, run):
    check_case(case, run)


# single pass (77 keys), looped (1000 keys cut to 296), odd head dim with odd keys
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("case, run", case_params(_picked("md-cross-32x32", "self-1000-d72", "d9-keys301"), SCENARIO_RUNS))
def test_attention_shared_kv(case, run, kind):
    check_case(case.replace(shared_kv=True, kind=kind), run)


@pytest.mark.parametrize("case, run", case_params(_picked("md-self-32x32", "sd15-cross-32x32", "keys299-d40"), SCENARIO_RUNS))
def test_attention_relu(case, run):
    """ReLU weights with separate K and V and a scale of 0.3 (not 1/sqrt(d))."""
    check_case(case.replace(shared_kv=False, kind="relu"), run, scale=0.3)


@pytest.mark.parametrize("scale, kind", [(-0.2, "softmax"), (-0.2, "relu"), (0.0, "softmax")])
@pytest.mark.parametrize("case, run", case_params(_picked("keys299-d40"), runs("cpp", "reference", size=TINY)))
def test_attention_unusual_scales(case, run, scale, kind):
    """A negative scale flips which key is the max; zero gives uniform softmax weights (and an
    all-zero ReLU output, which a relative error cannot judge, so that one is left out)."""
    check_case(case.replace(kind=kind), run, scale=scale)


@pytest.mark.parametrize("case, run", case_params(_picked("sd15-cross-64x64", "self-1000-d72", "d9"), SCENARIO_RUNS))
def test_attention_fused_qkv_views(case, run):
    """q, k, v as strided slices of one fused projection; a read outside a view (e.g. of padded
    head dims) turns the output into NaN."""
    (q, k, v), _ = case.inputs()
    slot_of = {id(q): 0, id(k): 1, id(v): 2}
    check_case(case, run, args=(q, k, v), cast=lambda a, dt, dev: fused_slot(slot_of[id(a)])(a, dt, dev))


@pytest.mark.parametrize("case, run", case_params(_picked("sd15-cross-64x64"), SCENARIO_RUNS))
def test_attention_heads_major_views(case, run):
    """(B, L, H, D) views of (B, H, L, D) storage, 3 heads, shared K/V."""
    check_case(case.replace(heads=3, shared_kv=True), run, cast=heads_major)


def _every_other(value, dtype, device):
    """Head dim with stride 2 (NaN in between)."""
    if not isinstance(value, torch.Tensor):
        return value
    wide = torch.full((*value.shape[:-1], 2 * value.shape[-1]), float("nan"), dtype=dtype, device=device)
    wide[..., ::2] = value.to(device=device, dtype=dtype)
    return wide[..., ::2]


@pytest.mark.parametrize("case, run", case_params(_picked("keys299-d40"), SCENARIO_RUNS))
def test_attention_non_unit_last_stride(case, run):
    """A head dim with stride 2 is copied to a contiguous layout first, and still computes right."""
    check_case(case, run, cast=_every_other)


def _copies_made(fn):
    """Names of the copying aten ops that fn() runs (the profiler sees every dispatched op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()} & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy"}


@pytest.mark.parametrize("run", runs("cpp"))
def test_attention_views_are_not_copied(run):
    """Slices of a fused qkv projection go to the kernel as they are, with no aten copy (the
    kernel's own one-pass packing of K/V tiles, e.g. bf16 V pairs, is not a tensor op); a non-unit
    last stride is made contiguous (which shows the probe sees copies made inside the extension)."""
    dtype = run.dtype
    qkv = torch.randn(2, 300, 3, 2, 40, dtype=dtype)
    q, k, v = qkv.unbind(2)
    with ops.use_backend(run.backend):
        assert _copies_made(lambda: ops.attention(q, k, v)) == set()
        assert _copies_made(lambda: ops.attention(q, k)) == set()
        strided = torch.randn(2, 30, 2, 80, dtype=dtype)[..., ::2]
        assert _copies_made(lambda: ops.attention(strided, strided, strided)) != set()


_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import sys, torch
    from fastdiff import ops
    from fastdiff.shapes import TINY, case
    from helpers import check_against_reference
    assert ops.cpp_simd_level() == sys.argv[1], f"FASTDIFF_SIMD={sys.argv[1]} gave {ops.cpp_simd_level()}"
    for name in ("sd15-cross-64x64", "self-1000-d72", "d9", "keys1-d160"):  # 77 keys, looped d72, odd d, one key d160
        (q, k, v), _ = case("attention", name, size=TINY).replace(shared_kv=False).inputs()
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
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    if order.index(ops.cpp_simd_level()) < order.index(level):
        pytest.skip(f"this CPU tops out at {ops.cpp_simd_level()}")
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
    """The C++ binding's attention called directly: a RuntimeError naming the argument, never a crash."""
    extension = cpp_build.load()  # the binding itself, as a caller that skips fastdiff.ops has it

    args, message = DIRECT_BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        extension.attention(*args)
