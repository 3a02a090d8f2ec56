"""Kernel table: each fastdiff op beside its torch baseline at the real models' shapes, same run.

Shapes are batch 2 at 512x512 (64x64 latents): SD1.5 and MobileDiffusion's levels. Each row
gives the torch and fastdiff medians, the speedup (torch / fastdiff), fastdiff's achieved
GFLOP/s (products) or GB/s (bandwidth-bound ops), and the issue's target for that row.
The cases are also the parameters of the pytest-benchmark files in bench/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Callable

import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.bench.timing import format_table, median_ms


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    baseline_name: str
    make: Callable[[torch.dtype, str], tuple[Callable, Callable]]  # -> (baseline_fn, fastdiff_fn)
    work: float  # flops (products) or bytes (bandwidth-bound ops)
    unit: str  # "GFLOP/s" or "GB/s"
    target: float | None  # required speedup (baseline ms / fastdiff ms), None if the issue sets none

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape},{str(self.dtype).removeprefix('torch.')}]"


def _randn(*shape, dtype, device, channels_last=False):
    t = torch.randn(*shape, device=device).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _attention(B, Lq, Lk, H, D, *, shared_kv=False, vs_separate=False):
    def make(dtype, device):
        q = _randn(B, Lq, H, D, dtype=dtype, device=device)
        k = _randn(B, Lk, H, D, dtype=dtype, device=device)
        v = None if shared_kv else _randn(B, Lk, H, D, dtype=dtype, device=device)
        fast = lambda: ops.attention(q, k, v)  # noqa: E731
        if vs_separate:  # baseline: the same kernel with a separate V tensor
            v_sep = _randn(B, Lk, H, D, dtype=dtype, device=device)
            return (lambda: ops.attention(q, k, v_sep)), fast
        # SDPA gets the (B, H, L, D) contiguous layout it prefers: transposes are not charged to it.
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        vt = kt if v is None else v.transpose(1, 2).contiguous()
        return (lambda: F.scaled_dot_product_attention(qt, kt, vt)), fast

    return make


def _group_norm(N, C, H, W, groups=32):
    def make(dtype, device):
        x = _randn(N, C, H, W, dtype=dtype, device=device, channels_last=True)
        w, b = _randn(C, dtype=dtype, device=device), _randn(C, dtype=dtype, device=device)
        return (lambda: F.silu(F.group_norm(x, groups, w, b))), (lambda: ops.group_norm(x, groups, w, b, silu=True))

    return make


def _glu(rows, width, activation):
    def make(dtype, device):
        h = _randn(2, rows, 2 * width, dtype=dtype, device=device)
        act = F.gelu if activation == "gelu" else F.silu

        def baseline():
            a, gate = h.chunk(2, dim=-1)
            return a * act(gate)

        return baseline, (lambda: ops.glu(h, activation=activation))

    return make


def _separable_conv(N, C, H, W, C_out, *, pointwise_only_baseline):
    def make(dtype, device):
        x = _randn(N, C, H, W, dtype=dtype, device=device, channels_last=True)
        dw_w, dw_b = _randn(C, 1, 3, 3, dtype=dtype, device=device), _randn(C, dtype=dtype, device=device)
        pw_w, pw_b = _randn(C_out, C, 1, 1, dtype=dtype, device=device), _randn(C_out, dtype=dtype, device=device)
        if pointwise_only_baseline:  # the floor: torch's 1x1 conv alone (oneDNN on CPU)
            baseline = lambda: F.conv2d(x, pw_w, pw_b)  # noqa: E731
        else:
            baseline = lambda: F.conv2d(F.conv2d(x, dw_w, dw_b, padding=1, groups=C), pw_w, pw_b)  # noqa: E731
        return baseline, (lambda: ops.separable_conv2d(x, dw_w, dw_b, pw_w, pw_b))

    return make


def _cases_for(dtype: torch.dtype) -> list[Case]:
    bf16 = dtype == torch.bfloat16
    size = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for Lq, H, D in [(4096, 8, 40), (1024, 10, 64), (1024, 8, 80)]:
        flops = 4 * 2 * H * Lq * Lq * D
        cases.append(Case("attention self", f"2x{Lq}x{H}x{D}", dtype, "SDPA", _attention(2, Lq, Lq, H, D), flops, "GFLOP/s", 2.5 if bf16 else 1.5))
    for Lq, H, D in [(4096, 8, 40), (1024, 8, 80), (256, 8, 160)]:
        flops = 4 * 2 * H * Lq * 77 * D
        cases.append(Case("attention cross", f"2x{Lq}x{H}x{D}, 77 keys", dtype, "SDPA", _attention(2, Lq, 77, H, D), flops, "GFLOP/s", 3.0 if bf16 else 2.0))
    cases.append(
        Case("attention shared K/V", "2x1024x10x64", dtype, "fastdiff separate K/V",
             _attention(2, 1024, 1024, 10, 64, shared_kv=True, vs_separate=True), 4 * 2 * 10 * 1024 * 1024 * 64, "GFLOP/s", 1.0)
    )
    for C, HW in [(320, 64), (640, 32), (1280, 16)]:
        nbytes = 2 * (2 * C * HW * HW) * size
        cases.append(Case("group_norm+silu", f"2x{C}x{HW}x{HW} NHWC", dtype, "F.group_norm+F.silu", _group_norm(2, C, HW, HW), nbytes, "GB/s", 3.0))
    for rows, width, act in [(4096, 1280, "gelu"), (256, 3072, "silu")]:
        nbytes = 3 * 2 * rows * width * size
        cases.append(Case(f"glu ({act})", f"2x{rows}x{2 * width}", dtype, "chunk+act+mul", _glu(rows, width, act), nbytes, "GB/s", None))
    for C, HW in [(320, 64), (640, 32), (1024, 16)]:
        flops = 2 * 2 * HW * HW * C * (C + 9)
        for pointwise_only in (False, True):
            baseline = "conv 1x1 alone" if pointwise_only else "conv dw3x3 + conv 1x1"
            cases.append(
                Case("separable_conv2d", f"2x{C}x{HW}x{HW}->{C} NHWC", dtype, baseline,
                     _separable_conv(2, C, HW, HW, C, pointwise_only_baseline=pointwise_only), flops, "GFLOP/s",
                     1 / 1.1 if pointwise_only else None)
            )
    return cases


def cases(dtypes=(torch.float32, torch.bfloat16)) -> list[Case]:
    return [c for dtype in dtypes for c in _cases_for(dtype)]


def measure(case: Case, *, device: str, repeats: int) -> dict:
    baseline_fn, fast_fn = case.make(case.dtype, device)
    baseline_ms = median_ms(baseline_fn, device=device, repeats=repeats)
    fast_ms = median_ms(fast_fn, device=device, repeats=repeats)
    speedup = baseline_ms / fast_ms
    return {
        "op": case.op, "shape": case.shape, "dtype": str(case.dtype).removeprefix("torch."), "baseline": case.baseline_name,
        "baseline_ms": baseline_ms, "fastdiff_ms": fast_ms, "speedup": speedup,
        "throughput": case.work / fast_ms / 1e6, "unit": case.unit, "target": case.target,
        "met": None if case.target is None else speedup >= case.target,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "all"], default="all", help="dtypes to run (fp16: GPU only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default="", help="only rows whose op contains this text (e.g. 'attention')")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "fp16": [torch.float16]}
    dtypes = names.get(args.dtype, [torch.float32, torch.bfloat16] + ([torch.float16] if args.device == "cuda" else []))
    selected = [c for c in cases(dtypes) if args.ops in c.op]
    backend = ops.selected_name(torch.device(args.device).type)
    print(f"fastdiff kernels on {args.device} (backend {backend}, {torch.get_num_threads()} threads); median of {args.repeats} runs; speedup = baseline / fastdiff")
    rows, results = [], []
    try:
        from tqdm import tqdm
        progress = tqdm(selected, desc="kernels", leave=False)
    except ImportError:
        progress = selected
    for case in progress:
        r = measure(case, device=args.device, repeats=args.repeats)
        results.append(r)
        target = "-" if r["target"] is None else f">= {r['target']:.2f}x {'MET' if r['met'] else 'MISSED'}"
        rows.append([r["op"], r["shape"], r["dtype"], r["baseline"], f"{r['baseline_ms']:.2f}", f"{r['fastdiff_ms']:.2f}",
                     f"{r['speedup']:.2f}x", f"{r['throughput']:.0f} {r['unit']}", target])
    print(format_table(["op", "shape", "dtype", "baseline", "baseline ms", "fastdiff ms", "speedup", "fastdiff rate", "target"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "backend": backend, "threads": torch.get_num_threads(), "rows": results}, f, indent=2)
    return 0
