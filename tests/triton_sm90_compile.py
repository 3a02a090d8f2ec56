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
    """(label, thunk) pairs calling the kernels' Python entry points at SD1.5 / MobileDiffusion sizes."""
    import fastdiff.kernels as K

    e = torch.empty
    cases = []
    for dtype in (torch.float16, torch.float32):
        for B, Lq, Lk, H, D, kind, shared in [
            (2, 4096, 4096, 8, 40, "softmax", False),
            (2, 4096, 77, 8, 40, "softmax", False),
            (2, 1024, 1024, 8, 80, "softmax", False),
            (2, 1024, 77, 8, 80, "softmax", False),
            (2, 256, 256, 8, 160, "softmax", False),
            (2, 256, 77, 8, 160, "softmax", False),
            (2, 1024, 1024, 10, 64, "relu", True),
            (2, 1024, 16, 10, 64, "softmax", False),
        ]:
            q, k = e(B, Lq, H, D, dtype=dtype), e(B, Lk, H, D, dtype=dtype)
            v = None if shared else e(B, Lk, H, D, dtype=dtype)
            cases.append((f"attention {dtype} q{(B, Lq, H, D)} k{Lk} {kind} shared={shared}", lambda q=q, k=k, v=v, kind=kind: K.attention(q, k, v, kind=kind)))
    q = e(2, 4096, 8, 40, dtype=torch.bfloat16)
    cases.append(("attention bf16 self-4096-d40", lambda: K.attention(q, q, q)))
    for dtype in (torch.float16, torch.float32):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x, w = e(2, 320, 64, 64, dtype=dtype).contiguous(memory_format=fmt), e(320, dtype=dtype)
            cases.append((f"group_norm {dtype} 2x320x64x64 {fmt}", lambda x=x, w=w: K.group_norm(x, 32, w, w, silu=True)))
        h = e(2, 4096, 2 * 1280, dtype=dtype)
        for activation in ("gelu", "silu"):
            cases.append((f"glu {dtype} {activation}", lambda h=h, a=activation: K.glu(h, activation=a)))
        for (N, C, Hh, W), C_out in [((2, 320, 64, 64), 320), ((2, 1024, 16, 16), 1024)]:
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = e(N, C, Hh, W, dtype=dtype).contiguous(memory_format=fmt)
                args = (x, e(C, 1, 3, 3, dtype=dtype), e(C, dtype=dtype), e(C_out, C, 1, 1, dtype=dtype), e(C_out, dtype=dtype))
                cases.append((f"separable_conv2d {dtype} {C}->{C_out} {Hh}x{W} {fmt}", lambda args=args: K.separable_conv2d(*args)))
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
