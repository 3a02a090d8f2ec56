"""Kernel table: each fastdiff op beside its torch baseline at the real models' shapes, same run.

Shapes: the real models' cases of fastdiff.shapes (SD1.5 and MobileDiffusion at batch 2,
InstructPix2Pix at batch 3, the VAE decoder; 512x512 images or a 504x376 photo). Each row
gives the torch and fastdiff medians, the speedup (torch / fastdiff), fastdiff's achieved
GFLOP/s (products) or GB/s (bandwidth-bound ops), and the issue's target for that row.
The pytest-benchmark files in bench/ time the same cases.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Callable

import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.bench.timing import format_table, median_ms
from fastdiff.shapes import model_cases


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


def _on(case, dtype, device):
    """The case's inputs in `dtype` on `device` (made in fp32 on the CPU)."""
    args, _ = case.inputs(dtype=torch.float32)
    return tuple(a.to(device=device, dtype=dtype) if isinstance(a, torch.Tensor) else a for a in args)


def _attention(case, *, vs_separate=False):
    def make(dtype, device):
        q, k, v = _on(case, dtype, device)  # v None: shared K/V
        fast = lambda: ops.attention(q, k, v, kind=case.kind)  # noqa: E731
        if vs_separate:  # baseline: the same kernel with a separate V tensor
            v_sep = torch.randn_like(k)
            return (lambda: ops.attention(q, k, v_sep, kind=case.kind)), fast
        # The baseline gets the (B, H, L, D) contiguous layout it prefers: transposes are not charged to it.
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        vt = kt if v is None else v.transpose(1, 2).contiguous()
        if case.kind == "relu":  # no torch op: relu(q kᵀ · scale) / Lk, then · v, materialised
            scale, inv_keys = qt.shape[-1] ** -0.5, 1.0 / kt.shape[-2]
            return (lambda: (torch.relu(qt @ kt.transpose(-1, -2) * scale) * inv_keys) @ vt), fast
        return (lambda: F.scaled_dot_product_attention(qt, kt, vt)), fast

    return make


def _group_norm(case):
    def make(dtype, device):
        x, groups, w, b, eps = _on(case, dtype, device)
        x = x.contiguous(memory_format=torch.channels_last)
        if case.silu:
            baseline = lambda: F.silu(F.group_norm(x, groups, w, b, eps))  # noqa: E731
        else:
            baseline = lambda: F.group_norm(x, groups, w, b, eps)  # noqa: E731
        return baseline, (lambda: ops.group_norm(x, groups, w, b, eps, silu=case.silu))

    return make


def _glu(case):
    def make(dtype, device):
        (h,) = _on(case, dtype, device)
        act = F.gelu if case.activation == "gelu" else F.silu

        def baseline():
            a, gate = h.chunk(2, dim=-1)
            return a * act(gate)

        return baseline, (lambda: ops.glu(h, activation=case.activation))

    return make


def _separable_conv(case, *, pointwise_only_baseline):
    def make(dtype, device):
        x, dw_w, dw_b, pw_w, pw_b = _on(case, dtype, device)
        x = x.contiguous(memory_format=torch.channels_last)
        if pointwise_only_baseline:  # the floor: torch's 1x1 conv alone (oneDNN on CPU)
            baseline = lambda: F.conv2d(x, pw_w, pw_b)  # noqa: E731
        else:
            baseline = lambda: F.conv2d(F.conv2d(x, dw_w, dw_b, padding=1, groups=case.channels), pw_w, pw_b)  # noqa: E731
        return baseline, (lambda: ops.separable_conv2d(x, dw_w, dw_b, pw_w, pw_b))

    return make


def _cases_for(dtype: torch.dtype) -> list[Case]:
    """One row per model case of fastdiff.shapes (and two per separable conv: both baselines), with
    the issue's target for its kind of row."""
    bf16 = dtype == torch.bfloat16
    size = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for c in model_cases("attention"):
        B, Lq, Lk, H, D = c.dims
        flops = 4 * B * H * Lq * Lk * D
        if c.kind == "relu":
            rows.append(Case("attention relu", c.label, dtype, "materialised relu", _attention(c), flops, "GFLOP/s", None))
        elif Lq == Lk:
            rows.append(Case("attention self", c.label, dtype, "SDPA", _attention(c), flops, "GFLOP/s", 2.5 if bf16 else 1.5))
        else:
            rows.append(Case("attention cross", c.label, dtype, "SDPA", _attention(c), flops, "GFLOP/s", 3.0 if bf16 else 2.0))
        if c.shared_kv:  # shared K/V must be no slower than a separate V
            rows.append(Case("attention shared K/V", c.label, dtype, "fastdiff separate K/V", _attention(c, vs_separate=True),
                             flops, "GFLOP/s", 1.0))
    for c in model_cases("group_norm"):
        nbytes = 2 * math.prod(c.shape) * size
        baseline = "F.group_norm+F.silu" if c.silu else "F.group_norm"
        shape = "x".join(map(str, c.shape)) + ("" if c.groups == 32 else f" g{c.groups}") + " NHWC"
        rows.append(Case("group_norm+silu" if c.silu else "group_norm", shape, dtype, baseline, _group_norm(c),
                         nbytes, "GB/s", 3.0 if c.silu else None))
    for c in model_cases("glu"):
        nbytes = 1.5 * math.prod(c.shape) * size  # h read, half of it written
        rows.append(Case(f"glu ({c.activation})", "x".join(map(str, c.shape)), dtype, "chunk+act+mul", _glu(c), nbytes, "GB/s", None))
    for c in model_cases("separable_conv2d"):
        N, C, H, W = c.shape
        flops = 2 * N * H * W * C * (c.out_channels + 9)
        for pointwise_only in (False, True):
            baseline = "conv 1x1 alone" if pointwise_only else "conv dw3x3 + conv 1x1"
            rows.append(Case("separable_conv2d", f"{c.label} NHWC", dtype, baseline,
                             _separable_conv(c, pointwise_only_baseline=pointwise_only), flops, "GFLOP/s",
                             1 / 1.1 if pointwise_only else None))
    return rows


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
