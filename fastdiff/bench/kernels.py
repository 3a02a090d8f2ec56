"""Kernel table: each fastdiff op beside its torch baselines at the real models' shapes, same run.

Also the one harness of every kernel table: `kernel_run` gives a fastdiff.shapes case's fastdiff
call and its baselines' calls on a device, `measure` times them and checks fastdiff's output
against the first baseline's. bench/bench_kernels.py (pytest-benchmark) and tools/gpu_check.py
(`make gpu-check`) time the same calls.

Baselines, on (B, H, L, D) or NCHW copies made outside the timed call where torch prefers them:
  attention (softmax)  F.scaled_dot_product_attention (on CUDA also its forced flash, cuDNN and
                       memory-efficient backends); shared K/V passes K twice, and fastdiff with a
                       separate V tensor is a baseline too (one K/V read must be no slower)
  attention (relu)     relu(q kᵀ · scale) / Lk · v, materialised, as plain torch writes it
  group_norm           F.group_norm (+ F.silu) on NHWC input (fastdiff's) and on NCHW (diffusers')
  glu                  chunk + gelu/silu + mul
  separable_conv2d     depthwise 3x3 + 1x1 F.conv2d, and the 1x1 alone (the floor)
  linear_int8          (fp32 rows only) F.linear in fp32 and fastdiff's fp32 ops.linear (oneDNN), on the
                       float weight; fastdiff's is ops.linear on ops.quantize_weight's int8 weight (quantized
                       before timing; activations quantized in the call). Its rate is GOP/s (no int8 peak is
                       measured) and its check is against fp32: the quantization error, not a kernel's
Each row: the medians, speedup = baseline ms / fastdiff ms, fastdiff's achieved GFLOP/s (FLOPs
counted by fastdiff.models.flops) or GB/s (bandwidth-bound ops: bytes read + written) and that
as a share of this machine's measured peak (fastdiff.bench.peak), the output check (relative L2
error, a gross-error bound per dtype: accuracy proper is the tests' job) and the issue's target.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff import shapes
from fastdiff.bench.peak import bandwidth_peak, compute_peak
from fastdiff.bench.timing import format_table, median_ms
from fastdiff.models.flops import count_call_macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a row's rate counts: FLOPs for the products, bytes for the bandwidth-bound ops.
UNITS = {"attention": "GFLOP/s", "separable_conv2d": "GFLOP/s", "group_norm": "GB/s", "glu": "GB/s", "linear_int8": "GOP/s"}
# Gross-error bound of a row's output check (fastdiff vs its first baseline, relative L2 norm).
ROW_BOUND = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 3e-2}
OP_BOUND = {"linear_int8": 3e-2}  # int8 against fp32: ~1e-2 on these standard-normal inputs (tests/test_int8.py)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclasses.dataclass
class KernelRun:
    """One case ready to time: fastdiff's call and each baseline's (all return their output, the
    baselines' in fastdiff's shape), the work one call does and the issue's speedup targets."""

    case: shapes.Case
    dtype: torch.dtype
    device: str
    fastdiff: Callable
    baselines: dict[str, Callable]
    work: float  # FLOPs (GFLOP/s rows) or bytes (GB/s rows) of one call
    unit: str  # "GFLOP/s" or "GB/s"
    targets: dict[str, float] = dataclasses.field(default_factory=dict)  # baseline name -> required speedup


def _sdpa_backends(device_type: str) -> dict[str, object]:
    """SDPA variants to time: the default choice, and on CUDA each forced backend."""
    variants = {"SDPA": None}
    if device_type == "cuda":
        from torch.nn.attention import SDPBackend

        variants.update({"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
                         "SDPA mem-efficient": SDPBackend.EFFICIENT_ATTENTION})
    return variants


def _sdpa(backend, q, k, v):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def _flops(case, args, options) -> float:
    """2 x the MACs fastdiff.models.flops counts for the case's op, on meta tensors (nothing computed)."""
    meta = tuple(torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a for a in args)
    return 2.0 * sum(count_call_macs(getattr(ops, case.op), *meta, **options).values())


def kernel_run(case: shapes.Case, dtype: torch.dtype, device="cpu", *, backend: str | None = None) -> KernelRun:
    """The calls of `case` in `dtype` on `device`; fastdiff's on `backend` (by name: a broken
    backend fails instead of timing a fallback), or the automatic choice when None. The issue's
    speedup targets are the CPU's (none on other devices)."""
    device_type = torch.device(device).type
    args, options = case.inputs(dtype=dtype, device=device)

    def fastdiff(fn):
        if backend is None:
            return fn

        def on_backend():
            with ops.use_backend(backend):
                return fn()

        return on_backend

    cpu, bf16 = device_type == "cpu", dtype == torch.bfloat16
    targets = {}
    if case.op == "attention":
        q, k, v = args  # v None: shared K/V
        kind = options["kind"]
        fast = fastdiff(lambda: ops.attention(q, k, v, kind=kind))
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        vt = kt if v is None else v.transpose(1, 2).contiguous()
        back = lambda o: o.transpose(1, 2)  # noqa: E731  (B, H, L, D) -> fastdiff's (B, L, H, D)
        if kind == "relu":
            scale, inv_keys = q.shape[-1] ** -0.5, 1.0 / k.shape[1]
            baselines = {"materialised relu": lambda: back((torch.relu(qt @ kt.transpose(-1, -2) * scale) * inv_keys) @ vt)}
        else:
            baselines = {name: (lambda b=b: back(_sdpa(b, qt, kt, vt))) for name, b in _sdpa_backends(device_type).items()}
            if cpu:
                self_attention = case.seqlen_q == case.seqlen_k
                targets["SDPA"] = (2.5 if bf16 else 1.5) if self_attention else (3.0 if bf16 else 2.0)
        if v is None:
            v_separate = torch.randn_like(k)
            baselines["fastdiff separate K/V"] = fastdiff(lambda: ops.attention(q, k, v_separate, kind=kind))
            if cpu:
                targets["fastdiff separate K/V"] = 1.0
        return KernelRun(case, dtype, device, fast, baselines, _flops(case, args, options), UNITS[case.op], targets)
    if case.op == "group_norm":
        x, groups, w, b, eps = args
        silu = options["silu"]
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fast = fastdiff(lambda: ops.group_norm(x_cl, groups, w, b, eps, silu=silu))

        def torch_norm(inp):
            out = F.group_norm(inp, groups, w, b, eps)
            return F.silu(out) if silu else out

        label = "F.group_norm+F.silu" if silu else "F.group_norm"
        if cpu and silu:
            targets[f"{label} NHWC"] = 3.0
        return KernelRun(case, dtype, device, fast, {f"{label} NHWC": lambda: torch_norm(x_cl), f"{label} NCHW": lambda: torch_norm(x)},
                         2.0 * x.numel() * x.element_size(), UNITS[case.op], targets)
    if case.op == "glu":
        (h,) = args
        activation = options["activation"]
        act = F.gelu if activation == "gelu" else F.silu

        def chunk_act_mul():
            a, gate = h.chunk(2, dim=-1)
            return a * act(gate)

        return KernelRun(case, dtype, device, fastdiff(lambda: ops.glu(h, activation=activation)), {"chunk+act+mul": chunk_act_mul},
                         1.5 * h.numel() * h.element_size(), UNITS[case.op])  # h read, half of it written
    if case.op == "separable_conv2d":
        x, dw_w, dw_b, pw_w, pw_b = args
        x = x.contiguous(memory_format=torch.channels_last)
        pw_w = pw_w.contiguous(memory_format=torch.channels_last)
        channels = x.shape[1]
        fast = fastdiff(lambda: ops.separable_conv2d(x, dw_w, dw_b, pw_w, pw_b))
        conv = " (cuDNN)" if device_type == "cuda" else ""
        if device_type == "cuda":
            torch.backends.cudnn.benchmark = True
        depthwise = lambda: F.conv2d(x, dw_w, dw_b, padding=1, groups=channels)  # noqa: E731
        baselines = {f"conv dw3x3+1x1{conv}": lambda: F.conv2d(depthwise(), pw_w, pw_b),
                     f"conv 1x1 alone{conv}": lambda: F.conv2d(x, pw_w, pw_b)}
        if cpu:
            targets["conv 1x1 alone"] = 1 / 1.1
        return KernelRun(case, dtype, device, fast, baselines, _flops(case, args, options), UNITS[case.op], targets)
    if case.op == "linear_int8":
        x, weight, bias = args
        qweight = ops.quantize_weight(weight)
        fast = fastdiff(lambda: ops.linear(x, qweight, bias))
        baselines = {"F.linear fp32": lambda: F.linear(x, weight, bias),
                     "fastdiff fp32": fastdiff(lambda: ops.linear(x, weight, bias))}
        work = 2.0 * x[..., 0].numel() * weight.shape[0] * weight.shape[1]
        return KernelRun(case, dtype, device, fast, baselines, work, UNITS[case.op])
    raise ValueError(f"case: unknown op {case.op!r}")


def kernel_cases(*, size: str = shapes.FULL, names: Iterable[str] | None = None, ops_filter: Iterable[str] | None = None) -> list:
    """The models' cases of fastdiff.shapes at `size`, or the cases named (exact names, odd ones
    too), optionally only those of the given ops."""
    names, ops_filter = set(names or ()), set(ops_filter or ())
    unknown = names - {c.name for c in (*shapes.TABLE, *shapes.INT8_LINEAR)}
    if unknown:
        raise ValueError(f"names: no case named {sorted(unknown)} in fastdiff.shapes")
    selected = shapes.cases(size=size) if names else shapes.model_cases(size=size)
    return [c for c in selected if (not names or c.name in names) and (not ops_filter or c.op in ops_filter)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float32 on out's device."""
    out, ref = out.float(), ref.to(out.device).float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(row: dict, out: torch.Tensor, expected: torch.Tensor) -> None:
    finite = bool(torch.isfinite(out).all())
    same_shape = out.shape == expected.shape
    row["error"] = rel_error(out, expected) if finite and same_shape else float("nan")
    if not finite:
        row["check"], row["problem"] = "mismatch", "output has NaN/inf"
    elif not same_shape:
        row["check"], row["problem"] = "mismatch", f"shape {tuple(out.shape)} vs {tuple(expected.shape)}"
    elif row["error"] > row["bound"]:
        row["check"], row["problem"] = "mismatch", f"relative error {row['error']:.2e} > {row['bound']:.0e}"
    else:
        row["check"] = "ok"


def measure(run: KernelRun, *, repeats: int = 7, budget_s: float = 10.0) -> dict:
    """Time fastdiff's call and each baseline's (their first call is a warm-up whose output is
    kept), and check fastdiff's output against the first baseline that runs. A fastdiff call that
    raises is the row's failure (check "error"); a baseline that raises is "unavailable"."""
    case = run.case
    row = {"op": case.op, "case": case.name, "model": case.model, "shape": case.label, "dtype": dtype_name(run.dtype),
           "device": str(run.device), "unit": run.unit, "fastdiff_ms": None, "rate": None, "baselines": {},
           "error": None, "bound": OP_BOUND.get(case.op, ROW_BOUND[run.dtype]), "check": None}
    time = lambda fn: median_ms(fn, device=run.device, warmup=1, repeats=repeats, budget_s=budget_s)  # noqa: E731
    with torch.inference_mode():
        try:
            out = run.fastdiff()
            row["fastdiff_ms"] = time(run.fastdiff)
        except Exception as exc:  # noqa: BLE001  a kernel that raises is this row's failure
            row["check"], row["problem"] = "error", f"fastdiff: {type(exc).__name__}: {exc}"[:500]
            return row
        row["rate"] = run.work / row["fastdiff_ms"] / 1e6
        for name, fn in run.baselines.items():
            target = run.targets.get(name)
            try:
                expected = fn()
                ms = time(fn)
            except Exception as exc:  # noqa: BLE001  e.g. no flash kernel for fp32 or this head dim
                row["baselines"][name] = {"ms": None, "speedup": None, "unavailable": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            speedup = ms / row["fastdiff_ms"]
            row["baselines"][name] = {"ms": ms, "speedup": speedup, "target": target,
                                      "met": None if target is None else speedup >= target}
            if row["check"] is None:
                row["checked_against"] = name
                _check(row, out, expected)
            del expected
    if row["check"] is None:
        row["check"] = "unchecked"
    return row


# ---------------------------------------------------------------------------------------------
# the table: `fastdiff bench kernels`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all", help="dtypes to run (fp16: GPU only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["auto", *ops.BACKENDS], default="auto", help="fastdiff's backend (default: automatic)")
    parser.add_argument("--ops", default="", help="only cases whose op contains this text (e.g. 'attention')")
    parser.add_argument("--cases", default="", help="only these fastdiff.shapes cases, comma-separated (odd ones too)")
    parser.add_argument("--size", choices=shapes.SIZES, default=shapes.FULL,
                        help="the cases' size (full: the models'; quick, tiny: reduced, for a quick look)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _rows_of(r: dict, percent: Callable[[dict], str]) -> list[list[str]]:
    """One table line per (case, baseline)."""
    check = f"ok {r['error']:.0e}" if r["check"] == "ok" else f"{r['check']}: {r['problem']}"[:70] if r.get("problem") else r["check"]
    lead = [r["case"], r["shape"], r["dtype"]]
    if r["fastdiff_ms"] is None:
        return [lead + ["-", "-", "-", "-", "-", "-", check, "-"]]
    lines = []
    for name, b in r["baselines"].items():
        if b["ms"] is None:
            lines.append(lead + [name, "n/a", f"{r['fastdiff_ms']:.3f}", "-", "-", "-", check, "-"])
            continue
        target = "-" if b["target"] is None else f">= {b['target']:.2f}x {'MET' if b['met'] else 'MISSED'}"
        lines.append(lead + [name, f"{b['ms']:.3f}", f"{r['fastdiff_ms']:.3f}", f"{b['speedup']:.2f}x",
                             f"{r['rate']:.0f} {r['unit']}", percent(r), check, target])
    return lines


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected a positive integer, got {args.repeats}")
    device_type = torch.device(args.device).type
    dtypes = [DTYPES[args.dtype]] if args.dtype != "all" else [torch.float32, torch.bfloat16] + ([torch.float16] if device_type == "cuda" else [])
    names = [n for n in (s.strip() for s in args.cases.split(",")) if n]
    selected = [c for c in kernel_cases(size=args.size, names=names) if args.ops in c.op]
    int8 = [c for c in shapes.int8_linear_cases(models=None if names else shapes.MODELS, size=args.size)
            if args.ops in c.op and (not names or c.name in names)] if torch.float32 in dtypes and device_type == "cpu" else []
    backend = None if args.backend == "auto" else args.backend
    backend_name = backend or ops.selected_name(device_type)
    print(f"fastdiff kernels on {args.device} (backend {backend_name}, {torch.get_num_threads()} threads, {args.size} sizes); "
          f"median of {args.repeats} runs; speedup = baseline / fastdiff")
    units = {UNITS[c.op] for c in (*selected, *int8)}
    peaks = {}
    if "GFLOP/s" in units:
        for dtype in dtypes:
            peaks["GFLOP/s", dtype] = peak = compute_peak(dtype, args.device)
            print(f"peak {peak.rate:.0f} GFLOP/s {dtype_name(dtype)}: {peak.how}")
    if "GB/s" in units:
        peak = bandwidth_peak(args.device)
        peaks.update({("GB/s", dtype): peak for dtype in dtypes})
        print(f"peak {peak.rate:.0f} GB/s: {peak.how}")
    def percent(r: dict) -> str:
        peak = peaks.get((r["unit"], DTYPES[r["dtype"]]))
        return "-" if peak is None else peak.percent(r["rate"])

    try:
        from tqdm import tqdm
        progress = tqdm([(c, d) for d in dtypes for c in selected] + [(c, torch.float32) for c in int8], desc="kernels",
                        leave=False)
    except ImportError:
        progress = [(c, d) for d in dtypes for c in selected] + [(c, torch.float32) for c in int8]
    results, lines = [], []
    for case, dtype in progress:
        row = measure(kernel_run(case, dtype, args.device, backend=backend), repeats=args.repeats)
        peak = peaks.get((row["unit"], dtype))
        row["percent_of_peak"] = None if row["rate"] is None or peak is None else 100 * row["rate"] / peak.rate
        results.append(row)
        lines += _rows_of(row, percent)
    print(format_table(["case", "shape", "dtype", "baseline", "baseline ms", "fastdiff ms", "speedup", "fastdiff rate",
                        "% of peak", "check", "target"], lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "backend": backend_name, "threads": torch.get_num_threads(), "size": args.size,
                       "peaks": [{"dtype": dtype_name(d), **dataclasses.asdict(p)} for (_, d), p in peaks.items()],
                       "rows": results}, f, indent=2)
    wrong = [r for r in results if r["check"] in ("mismatch", "error")]
    for r in wrong:
        print(f"{r['case']} {r['dtype']}: {r['check']}: {r.get('problem')}")
    return 1 if wrong else 0
