"""GPU benchmark pieces of `make gpu-check` (fastdiff.bench.gpu_check): each Triton kernel beside
cuDNN / SDPA (flash, cuDNN, memory-efficient) at the models' shapes, and one UNet step beside
diffusers fp16 SDPA, measured in the same run.

Kernel shapes come from fastdiff.shapes (the models' cases, FULL size on the GPU). Baselines per op:
  attention (softmax)  F.scaled_dot_product_attention: default choice, then forced flash, cuDNN
                       and memory-efficient backends, on (B, H, L, D) contiguous copies (the
                       transposes are not charged to them); shared K/V passes K twice
  attention (relu)     relu(q kᵀ · scale) v / Lk materialised, as plain torch writes it
  group_norm           F.group_norm (+ F.silu) on NCHW (diffusers' layout) and on NHWC input
  glu                  chunk + gelu/silu + mul
  separable_conv2d     depthwise 3x3 + 1x1 F.conv2d (cuDNN on CUDA, cudnn.benchmark on), and
                       the 1x1 alone (the floor)
Each row also checks fastdiff's output against the first baseline's (relative norm error, a
gross-error bound per dtype: accuracy proper is the tests' job). Speedup = baseline ms / fastdiff ms.

UNet step (one forward at 512x512, 77 text tokens): SD1.5's UNet, fastdiff.UNet2DCondition against
diffusers' UNet2DConditionModel (its default SDPA attention processor) on the same random weights;
MobileDiffusion (no diffusers model exists) against the same module run as plain PyTorch with SDPA
attention. Both in fp16; the error of each fp16 run against the fp32 baseline (TF32 off) is
recorded, and fastdiff's must be at most max(2x the baseline's, 1e-2), the rule of
fastdiff.validate.compare_models.

Every function takes a device: on the CPU (tests, TRITON_INTERPRET=1) the same code runs at tiny
sizes, with the baselines that exist there (SDPA's default only).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import reference

# Gross-error bound of a benchmark row (fastdiff vs its first baseline, relative L2 norm).
ROW_BOUND = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable, *, device: str, rounds: int = 10, min_round_ms: float = 1.0, budget_s: float = 2.0,
            warmup: int = 1) -> dict:
    """Median milliseconds per call of fn() after `warmup` calls (compiles, cuDNN plan choice;
    0 when the caller has just run fn for its output).

    CUDA: CUDA events around `calls` back-to-back calls per round, `calls` chosen so a round lasts
    at least min_round_ms (launch gaps of tiny kernels do not dominate); the median over rounds.
    CPU: wall time of single calls. Stops early (keeping >= 3 rounds) past budget_s.
    """
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            estimate = max(start.elapsed_time(stop), 1e-3)
            calls = max(1, min(1000, math.ceil(min_round_ms / estimate)))
        else:
            calls = 1
        times = []
        began = time.perf_counter()
        for _ in range(rounds):
            if cuda:
                start.record()
                for _ in range(calls):
                    fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / calls)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 3 and time.perf_counter() - began > budget_s:
                break
    return {"ms": statistics.median(times), "rounds": len(times), "calls_per_round": calls}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float32 on out's device (cheap at full size)."""
    out, ref = out.float(), ref.to(out.device).float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# kernels


def _sdpa_backends(device: str) -> dict[str, object]:
    """SDPA variants to time: the default choice, and on CUDA each forced backend."""
    variants = {"SDPA": None}
    if torch.device(device).type == "cuda":
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


def kernel_runs(case, dtype: torch.dtype, device: str) -> tuple[Callable, dict[str, Callable]]:
    """(fastdiff call, {baseline name: call}) for one fastdiff.shapes case in `dtype` on `device`.
    Every call returns its output; the baselines' outputs have fastdiff's shape (layouts aside)."""
    args, kwargs = case.inputs(dtype=dtype, device=device)
    cuda = torch.device(device).type == "cuda"
    if case.op == "attention":
        q, k, v = args
        kind = kwargs["kind"]
        fast = lambda: ops.attention(q, k, v, kind=kind)  # noqa: E731
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        vt = kt if v is None else v.transpose(1, 2).contiguous()
        back = lambda o: o.transpose(1, 2)  # noqa: E731  (B, H, L, D) -> (B, L, H, D)
        if kind == "relu":
            scale = q.shape[-1] ** -0.5
            return fast, {"torch relu(qkᵀ)v": lambda: back(torch.relu(qt @ kt.transpose(-1, -2) * scale) @ vt / kt.shape[-2])}
        return fast, {name: (lambda b=b: back(_sdpa(b, qt, kt, vt))) for name, b in _sdpa_backends(device).items()}
    if case.op == "group_norm":
        x, groups, w, b, eps = args
        silu = kwargs["silu"]
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fast = lambda: ops.group_norm(x_cl, groups, w, b, eps, silu=silu)  # noqa: E731

        def torch_norm(inp):
            out = F.group_norm(inp, groups, w, b, eps)
            return F.silu(out) if silu else out

        label = "F.group_norm+F.silu" if silu else "F.group_norm"
        return fast, {f"{label} NCHW": lambda: torch_norm(x), f"{label} NHWC": lambda: torch_norm(x_cl)}
    if case.op == "glu":
        (h,) = args
        act = kwargs["activation"]
        return (lambda: ops.glu(h, activation=act)), {"chunk+act+mul": lambda: reference.glu(h, activation=act)}
    if case.op == "separable_conv2d":
        x, dw_w, dw_b, pw_w, pw_b = args
        x = x.contiguous(memory_format=torch.channels_last)
        pw_w = pw_w.contiguous(memory_format=torch.channels_last)
        C = x.shape[1]
        fast = lambda: ops.separable_conv2d(x, dw_w, dw_b, pw_w, pw_b)  # noqa: E731
        conv = " (cuDNN)" if cuda else ""
        dw = lambda: F.conv2d(x, dw_w, dw_b, padding=1, groups=C)  # noqa: E731
        return fast, {f"conv dw3x3+1x1{conv}": lambda: F.conv2d(dw(), pw_w, pw_b),
                      f"conv 1x1 alone{conv}": lambda: F.conv2d(x, pw_w, pw_b)}
    raise ValueError(f"unknown op {case.op!r}")


def kernel_cases(*, size: str, names: Iterable[str] | None = None, ops_filter: Iterable[str] | None = None) -> list:
    """The models' cases of fastdiff.shapes at `size`, optionally only those named (exact case
    names) or of the given ops."""
    from fastdiff import shapes

    names = set(names or ())
    unknown = names - {c.name for c in shapes.TABLE}
    if unknown:
        raise ValueError(f"no case named {sorted(unknown)} in fastdiff.shapes")
    selected = shapes.cases(size=size) if names else shapes.model_cases(size=size)
    return [c for c in selected if (not names or c.name in names) and (not ops_filter or c.op in set(ops_filter))]


def kernel_row(case, dtype: torch.dtype, device: str, *, rounds: int = 10, budget_s: float = 2.0) -> dict:
    """Time fastdiff's kernel (Triton backend, by name: a broken import fails instead of timing a
    fallback) and each baseline; check fastdiff's output against the first baseline's."""
    row = {"op": case.op, "case": case.name, "model": case.model, "shape": case.label, "dtype": dtype_name(dtype),
           "device": device, "fastdiff_ms": None, "baselines": {}, "error": None, "bound": ROW_BOUND[dtype], "check": None}
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    fast, baselines = kernel_runs(case, dtype, device)
    with ops.use_backend("triton"), torch.inference_mode():
        try:
            out = fast()
            row["fastdiff_ms"] = time_ms(fast, device=device, rounds=rounds, budget_s=budget_s, warmup=0)["ms"]
        except Exception as exc:  # noqa: BLE001  a kernel that raises is this row's failure
            row["check"], row["problem"] = "error", f"fastdiff: {type(exc).__name__}: {exc}"[:500]
            return row
    checked = False
    with torch.inference_mode():
        for name, fn in baselines.items():
            try:
                expected = fn()
                ms = time_ms(fn, device=device, rounds=rounds, budget_s=budget_s, warmup=0)["ms"]
            except Exception as exc:  # noqa: BLE001  e.g. no flash kernel for fp32 or this head dim
                row["baselines"][name] = {"ms": None, "speedup": None, "unavailable": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            row["baselines"][name] = {"ms": ms, "speedup": ms / row["fastdiff_ms"]}
            if not checked:
                checked = True
                row["checked_against"] = name
                finite = bool(torch.isfinite(out).all())
                row["error"] = rel_error(out, expected) if finite and out.shape == expected.shape else float("nan")
                ok = finite and out.shape == expected.shape and row["error"] <= row["bound"]
                row["check"] = "ok" if ok else "mismatch"
                if not ok:
                    row["problem"] = ("output has NaN/inf" if not finite else f"shape {tuple(out.shape)} vs {tuple(expected.shape)}"
                                      if out.shape != expected.shape else f"relative error {row['error']:.2e} > {row['bound']:.0e}")
    if not checked:
        row["check"] = "unchecked"
    return row


def kernel_rows(*, device: str, size: str, dtypes: Iterable[torch.dtype], names=None, ops_filter=None,
                rounds: int = 10, budget_s: float = 2.0, emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """kernel_row for every dtype x case; each row is passed to emit as soon as it is measured.
    Order: dtype by dtype, the ops taking turns (one case of each op, then the next), so a run cut
    by its time budget still has rows of every op in the first dtype."""
    by_op: dict[str, list] = {}
    for case in kernel_cases(size=size, names=names, ops_filter=ops_filter):
        by_op.setdefault(case.op, []).append(case)
    turns = [c for i in range(max(map(len, by_op.values()), default=0)) for cases in by_op.values() for c in cases[i:i + 1]]
    rows = []
    for dtype in dtypes:
        for case in turns:
            row = kernel_row(case, dtype, device, rounds=rounds, budget_s=budget_s)
            emit(row)
            rows.append(row)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# UNet step

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
# Test size: the same block types, 2 heads of 16 and 32 (inside the kernels' head dims).
SD15_TINY_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)


def fill_random(module: torch.nn.Module, device, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-device module on `device` with small random weights (norm weights 1,
    norm biases 0, the rest N(0, 0.02)), drawn on the device: no nn.init pass over 1e9 parameters."""
    module = module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 2)
            is_norm = len(leaf) >= 2 and "norm" in leaf[-2]
            if is_norm and name.endswith(".weight"):
                tensor.fill_(1.0)
            elif is_norm and name.endswith(".bias"):
                tensor.zero_()
            else:
                tensor.normal_(0, 0.02, generator=generator)
    return module.eval()


@contextlib.contextmanager
def _sdpa_reference_attention():
    """Plain-PyTorch ops with SDPA attention: the reference backend, its softmax attention swapped
    for F.scaled_dot_product_attention (what diffusers' attention processor calls) while inside."""
    original = reference.attention

    def attention(q, k, v=None, *, scale=None, kind="softmax"):
        if kind != "softmax":
            return original(q, k, v, scale=scale, kind=kind)
        v = k if v is None else v
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).contiguous()

    reference.attention = attention
    try:
        with ops.use_backend("reference"):
            yield
    finally:
        reference.attention = original


@contextlib.contextmanager
def _exact_fp32():
    """fp32 truth without TF32 in cuDNN convolutions or matmuls."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def _unet_models(model: str, *, device: str, tiny: bool):
    """(baseline module in fp32 with random weights, in_channels, context width, latent side) for
    'sd15' (diffusers' UNet2DConditionModel) or 'mobilediffusion' (fastdiff's own module)."""
    if model == "sd15":
        from diffusers import UNet2DConditionModel

        from fastdiff.models.unet_2d_condition import UNet2DCondition

        config = SD15_TINY_CONFIG if tiny else SD15_CONFIG
        with torch.device("meta"):
            diffusers_unet = UNet2DConditionModel(**config)
        diffusers_unet = fill_random(diffusers_unet, device)
        return diffusers_unet, config["in_channels"], config["cross_attention_dim"], config["sample_size"]
    if model == "mobilediffusion":
        from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

        config = MobileDiffusionConfig.from_preset("tiny" if tiny else "mobilediffusion")
        with torch.device("meta"):
            unet = MobileDiffusionUNet(config)
        return fill_random(unet, device), config.in_channels, config.cross_attention_dim, config.sample_size
    raise ValueError(f"model: expected 'sd15' or 'mobilediffusion', got {model!r}")


UNET_BASELINES = {"sd15": "diffusers fp16 SDPA", "mobilediffusion": "plain PyTorch + SDPA (same module; diffusers has none)"}


def unet_rows(model: str, *, device: str, batches: Iterable[int] = (1, 8), dtype: torch.dtype = torch.float16,
              tiny: bool = False, side: int | None = None, rounds: int = 5, budget_s: float = 10.0, warmup: int = 1, emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """One denoising step of `model` at each batch: fastdiff (Triton backend) and its baseline in
    `dtype`, plus the accuracy check at the first batch (both against the fp32 baseline).
    side: the latent side (default the config's: 64, 512x512 pixels; tiny: 8 or 16)."""
    base_name = UNET_BASELINES[model].replace("fp16", dtype_name(dtype))
    source, in_channels, width, config_side = _unet_models(model, device=device, tiny=tiny)
    side = side or config_side
    generator = torch.Generator(device=device).manual_seed(1)
    batches = list(batches)
    biggest = max(batches)
    sample_all = torch.randn(biggest, in_channels, side, side, generator=generator, device=device)
    context_all = torch.randn(biggest, 77, width, generator=generator, device=device)
    timestep = 500

    if model == "sd15":
        from fastdiff.models.unet_2d_condition import UNet2DCondition

        def baseline_step(s, c):
            return source(s, timestep, c).sample
        baseline_scope = contextlib.nullcontext
    else:
        def baseline_step(s, c):
            return source(s, timestep, c)
        baseline_scope = _sdpa_reference_attention

    rows = []
    with torch.inference_mode():
        # accuracy at the first batch: fp32 baseline (exact, no TF32) as the truth
        b0 = batches[0]
        s32, c32 = sample_all[:b0], context_all[:b0]
        with _exact_fp32(), baseline_scope():
            truth = baseline_step(s32, c32).float()
        source.to(dtype)  # the baseline in dtype; fastdiff's model shares its weights where it can
        if model == "sd15":
            fast_model = UNet2DCondition.from_diffusers(source, dtype=dtype, device=device)
        else:
            fast_model = source
        def fast_step(s, c):
            with ops.use_backend("triton"):
                return fast_model(s, timestep, c)
        with baseline_scope():
            base_error = rel_error(baseline_step(s32.to(dtype), c32.to(dtype)), truth)
        fast_out = fast_step(s32.to(dtype), c32.to(dtype))
        finite = bool(torch.isfinite(fast_out).all())
        fast_error = rel_error(fast_out, truth) if finite else float("nan")
        bound = max(2 * base_error, 1e-2)
        check = {"fastdiff_error": fast_error, "baseline_error": base_error, "bound": bound,
                 "passed": finite and fast_error <= bound, "batch": b0}
        del truth, fast_out
        for batch in batches:
            s, c = sample_all[:batch].to(dtype), context_all[:batch].to(dtype)
            row = {"model": model, "batch": batch, "dtype": dtype_name(dtype), "res": side * 8, "device": device,
                   "baseline": base_name, "fastdiff_ms": None, "baseline_ms": None, "speedup": None}
            if batch == b0:
                row["accuracy"] = check
            try:
                row["fastdiff_ms"] = time_ms(lambda: fast_step(s, c), device=device, rounds=rounds, min_round_ms=0,
                                                budget_s=budget_s, warmup=warmup)["ms"]
            except Exception as exc:  # noqa: BLE001
                row["problem"] = f"fastdiff: {type(exc).__name__}: {exc}"[:500]
            try:
                with baseline_scope():
                    row["baseline_ms"] = time_ms(lambda: baseline_step(s, c), device=device, rounds=rounds, min_round_ms=0,
                                                 budget_s=budget_s, warmup=warmup)["ms"]
            except Exception as exc:  # noqa: BLE001
                row["baseline_problem"] = f"{type(exc).__name__}: {exc}"[:500]
            if row["fastdiff_ms"] and row["baseline_ms"]:
                row["speedup"] = row["baseline_ms"] / row["fastdiff_ms"]
                row["images_per_s"] = batch / row["fastdiff_ms"] * 1e3
            emit(row)
            rows.append(row)
    return rows
