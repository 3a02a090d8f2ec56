"""Compile every Triton kernel for an H100 (sm_90) at real model sizes, on a machine without a GPU.

    .venv/bin/python tests/triton_sm90_compile.py      # one JSON line per compiled kernel

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and never sees the GPU compiler:
constexpr rules, layouts, shared memory and register allocation. This script goes through
Triton's real launch path (argument specialisation included) with a stand-in driver that reports
an sm_90 target, compiles down to a cubin with the bundled ptxas, and reads the cubin's resource
usage (registers, spill stack) with the bundled cuobjdump. Nothing is launched.
Relies on Triton internals (driver.set_active, JITFunction.run(warmup=True)); checked with 3.9.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are decorated

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

H100_SHARED_MEMORY = 227 * 1024  # per block, opt-in maximum on sm_90
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class _Sm90Driver:
    """Just enough of a driver for JITFunction.run to specialise and compile for sm_90."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(usage["REG"]), "spill_stack": int(usage["STACK"]) + int(usage["LOCAL"])}


def _cases():
    """(label, thunk) pairs calling the kernels' Python entry points at the real models' sizes
    (fastdiff.shapes, full size), and at one key (the smallest key block)."""
    import fastdiff.ops.triton as K
    from fastdiff.shapes import case

    e = torch.empty
    cases = []
    attention = ["sd15-self-64x64", "sd15-cross-64x64", "sd15-self-32x32", "sd15-cross-32x32", "sd15-self-16x16",
                 "sd15-cross-16x16", "md-relu-self-32x32", "keys1"]
    for dtype in (torch.float16, torch.float32):
        for name in attention:
            c = case("attention", name)
            B, Lq, Lk, H, D = c.dims
            q, k = e(B, Lq, H, D, dtype=dtype), e(B, Lk, H, D, dtype=dtype)
            v = None if c.shared_kv else e(B, Lk, H, D, dtype=dtype)
            cases.append((f"attention {dtype} {name}", lambda q=q, k=k, v=v, kind=c.kind: K.attention(q, k, v, kind=kind)))
    B, Lq, _, H, D = case("attention", "sd15-self-64x64").dims
    q = e(B, Lq, H, D, dtype=torch.bfloat16)
    cases.append(("attention bf16 sd15-self-64x64", lambda: K.attention(q, q, q)))
    for dtype in (torch.float16, torch.float32):
        c = case("group_norm", "sd15-320x64x64")
        for fmt in (torch.contiguous_format, torch.channels_last):
            x, w = e(*c.shape, dtype=dtype).contiguous(memory_format=fmt), e(c.channels, dtype=dtype)
            cases.append((f"group_norm {dtype} {c.name} {fmt}", lambda x=x, w=w, g=c.groups: K.group_norm(x, g, w, w, silu=True)))
        h = e(*case("glu", "sd15-geglu-64x64").shape, dtype=dtype)
        for activation in ("gelu", "silu"):
            cases.append((f"glu {dtype} {activation}", lambda h=h, a=activation: K.glu(h, activation=a)))
        for name in ("md-320x64x64", "md-1024x16x16"):
            c = case("separable_conv2d", name)
            C, C_out = c.channels, c.out_channels
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = e(*c.shape, dtype=dtype).contiguous(memory_format=fmt)
                args = (x, e(C, 1, 3, 3, dtype=dtype), e(C, dtype=dtype), e(C_out, C, 1, 1, dtype=dtype), e(C_out, dtype=dtype))
                cases.append((f"separable_conv2d {dtype} {name} {fmt}", lambda args=args: K.separable_conv2d(*args)))
    return cases


def main() -> int:
    driver.set_active(_Sm90Driver())
    compiled = []

    def compile_only(self, grid):
        return lambda *args, **kwargs: compiled.append((self.fn.__name__, kwargs, self.run(*args, grid=grid, warmup=True, **kwargs)))

    KernelInterface.__getitem__ = compile_only
    for label, call in _cases():
        call()
        for name, kwargs, kernel in compiled:
            config = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
            print(json.dumps({"case": label, "kernel": name, "config": config, "shared_memory": kernel.metadata.shared,
                              **_resource_usage(kernel.asm["cubin"])}), flush=True)
        compiled.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
