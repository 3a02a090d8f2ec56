"""C++ CPU glu (GEGLU / SwiGLU) vs torch's chunk + gelu/silu + mul at the real models' shapes (fastdiff.shapes).

    flock /tmp/fastdiff-bench.lock .venv/bin/python -m pytest bench/bench_glu.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Shapes: SD1.5's and InstructPix2Pix's GEGLU, MobileDiffusion's expansion-6 SwiGLU, each timed with
both activations; 2 threads. Bytes moved per call: h read + out written.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from benchutil import dtype_id, needs_cpp
from fastdiff.shapes import model_cases

pytestmark = needs_cpp

SHAPES = {c.name: c.shape for c in model_cases("glu")}
DTYPES = [torch.float32, torch.bfloat16]


def _torch_glu(h, activation):
    a, gate = h.chunk(2, dim=-1)
    return a * (F.gelu(gate) if activation == "gelu" else F.silu(gate))


@pytest.mark.parametrize("impl", ["torch", "fastdiff"])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(SHAPES))
def test_glu(benchmark, name, dtype, activation, impl):
    benchmark.group = f"glu-{activation} {name} {dtype_id(dtype)}"
    h = torch.randn(*SHAPES[name], generator=torch.Generator().manual_seed(0)).to(dtype)
    if impl == "torch":
        fn = lambda: _torch_glu(h, activation)
    else:

        def fn():
            with ops.use_backend("cpp"):
                return ops.glu(h, activation=activation)

    out = benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = 1.5 * h.numel() * h.element_size() / benchmark.stats.stats.median / 1e9
    assert out.shape == (*h.shape[:-1], h.shape[-1] // 2) and torch.isfinite(out).all()
