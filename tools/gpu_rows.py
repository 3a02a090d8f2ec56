"""The measurements of `make gpu-check`'s kernels and unet stages (tools/gpu_check.py runs them in
worker processes): each Triton kernel beside cuDNN / SDPA at the models' shapes, and one UNet step
beside diffusers fp16 SDPA, measured in the same run.

Kernels: the cases, calls and baselines of fastdiff.bench.kernels (the one kernel harness; FULL
size on the GPU), fastdiff on the Triton backend by name, each row with its output check.

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
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.bench.kernels import dtype_name, kernel_cases, kernel_run, measure, rel_error
from fastdiff.bench.timing import median_ms
from fastdiff.bench.unet import SD15_CONFIG, fill_random
from fastdiff.ops import reference


def kernel_rows(*, device: str, size: str, dtypes: Iterable[torch.dtype], names=None, ops_filter=None,
                rounds: int = 10, budget_s: float = 2.0, emit: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """fastdiff.bench.kernels.measure, fastdiff on the Triton backend, for every dtype x case; each
    row is passed to emit as soon as it is measured. Order: dtype by dtype, the ops taking turns
    (one case of each op, then the next), so a run cut by its time budget still has rows of every
    op in the first dtype."""
    by_op: dict[str, list] = {}
    for case in kernel_cases(size=size, names=names, ops_filter=ops_filter):
        by_op.setdefault(case.op, []).append(case)
    turns = [c for i in range(max(map(len, by_op.values()), default=0)) for cases in by_op.values() for c in cases[i:i + 1]]
    rows = []
    for dtype in dtypes:
        for case in turns:
            row = measure(kernel_run(case, dtype, device, backend="triton"), repeats=rounds, budget_s=budget_s)
            emit(row)
            rows.append(row)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# UNet step

# Test size: the same block types, 2 heads of 16 and 32 (inside the kernels' head dims).
SD15_TINY_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)



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
                row["fastdiff_ms"] = median_ms(lambda: fast_step(s, c), device=device, repeats=rounds, min_round_ms=0,
                                                  budget_s=budget_s, warmup=warmup)
            except Exception as exc:  # noqa: BLE001
                row["problem"] = f"fastdiff: {type(exc).__name__}: {exc}"[:500]
            try:
                with baseline_scope():
                    row["baseline_ms"] = median_ms(lambda: baseline_step(s, c), device=device, repeats=rounds, min_round_ms=0,
                                                   budget_s=budget_s, warmup=warmup)
            except Exception as exc:  # noqa: BLE001
                row["baseline_problem"] = f"{type(exc).__name__}: {exc}"[:500]
            if row["fastdiff_ms"] and row["baseline_ms"]:
                row["speedup"] = row["baseline_ms"] / row["fastdiff_ms"]
                row["images_per_s"] = batch / row["fastdiff_ms"] * 1e3
            emit(row)
            rows.append(row)
    return rows
