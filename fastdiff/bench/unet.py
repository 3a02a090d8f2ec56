"""UNet table: one denoising step of fastdiff's UNet beside diffusers (and OpenVINO) in the same run.

--model sd15 / ip2p: fastdiff.UNet2DCondition against diffusers' UNet2DConditionModel on the
same random weights (SD1.5's config; ip2p = InstructPix2Pix/MGIE's 8 input channels): diffusers
eager fp32, diffusers bf16 autocast channels_last, and OpenVINO (fp32 and bf16) when the `bench`
extra is installed. --model mobilediffusion: fastdiff.MobileDiffusionUNet against itself on the
reference backend (plain PyTorch ops), and OpenVINO running the same module when installed.
Speedup = baseline ms / fastdiff ms. Latent = res / 8, text context 77 x 768. Each row's GFLOP/s
counts the step's FLOPs (2 x the MACs of fastdiff.models.flops, attention matmuls included) and
is given as a share of this CPU's measured peak in the row's dtype (fastdiff.bench.peak).

--dtype int8 (issue 21): the same fp32 fastdiff UNet quantized by fastdiff.quantize (int8 weights of
its linear and 1x1 convolutions, W8A8; --int8-conv3x3 takes the 3x3 convolutions too) first, then
fastdiff fp32, the two timed round by round (timing.interleaved_ms: a shared machine's load hits
them alike), then the usual baselines in fp32. Printed under the table: int8 / fp32 step time
(issue 21's target for SD1.5: <= 0.6) and the int8 output's PSNR and relative L2 error against the
fp32 output on the same inputs. The int8 row has no % of peak (no int8 peak is measured; its
GFLOP/s counts the same FLOPs as the others).

fill_random and SD15_CONFIG serve the other tables (mgie, pipeline, ablations) and tools/gpu_check.py.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics

import torch

import fastdiff.ops as ops
from fastdiff.bench.peak import compute_peak
from fastdiff.bench.timing import format_table, interleaved_ms, median_ms
from fastdiff.models.flops import count_macs
from fastdiff.models.mobilediffusion import PRESETS
from fastdiff.quantization import quantize

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT8_TARGET = 0.6  # issue 21: an SD1.5 step on int8 weights in at most 0.6x fastdiff fp32's time

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def fill_random(module: torch.nn.Module, device="cpu", seed: int = 0) -> torch.nn.Module:
    """Materialise a module built on the meta device on `device` with small random weights (norm
    weights 1, norm biases 0, every other float tensor of the state dict N(0, 0.02)), drawn on the
    device: no nn.init pass over ~1e9 parameters. Buffers outside the state dict stay unset."""
    module = module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            owner = name.rsplit(".", 2)
            is_norm = len(owner) >= 2 and "norm" in owner[-2]
            if is_norm and name.endswith(".weight"):
                tensor.fill_(1.0)
            elif is_norm and name.endswith(".bias"):
                tensor.zero_()
            else:
                tensor.normal_(0, 0.02, generator=generator)
    return module.eval()


def step_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of model(*inputs), counted on meta copies of the inputs (model on the meta device too)."""
    meta = [torch.empty_like(t, device="meta") for t in inputs]
    return 2.0 * count_macs(model, *meta).total


def _openvino_runner(module, example: tuple, dtype_name: str):
    """A callable running `module` through OpenVINO on the CPU, or None when openvino is missing."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.compile_model(ov.convert_model(module, example_input=example), "CPU",
                                {"INFERENCE_PRECISION_HINT": "bf16" if dtype_name == "bf16" else "f32"})
    inputs = [t.numpy() for t in example]
    return lambda: compiled(inputs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["sd15", "ip2p", "mobilediffusion"], default="sd15")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mobilediffusion",
                        help="--model mobilediffusion's size (tiny: the test size, for a quick look)")
    parser.add_argument("--res", type=int, default=512, help="image side in pixels (latent side = res / 8)")
    parser.add_argument("--dtype", choices=[*sorted(_DTYPES), "int8"], default="bf16",
                        help="fastdiff's weights and activations (int8: int8 weights, fp32 activations, timed beside fp32)")
    parser.add_argument("--int8-conv3x3", action="store_true",
                        help="with --dtype int8: quantize the 3x3 convolutions too (fastdiff.quantize(conv3x3=True))")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (median reported)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop timing a row after this long (>= 3 runs kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO even when installed")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


@dataclasses.dataclass(frozen=True)
class Int8Accuracy:
    """The int8 UNet's output against the fp32 UNet's on the same inputs."""
    layers: int  # modules quantized
    psnr_db: float  # 20 log10(max |fp32 output| / RMS difference)
    relative_l2: float  # ||int8 - fp32|| / ||fp32||


def _int8_accuracy(out: torch.Tensor, reference: torch.Tensor, layers: int) -> Int8Accuracy:
    out, reference = out.double(), reference.double()
    rms = (out - reference).square().mean().sqrt().item()
    psnr = math.inf if rms == 0 else 20 * math.log10(reference.abs().max().item() / rms)
    return Int8Accuracy(layers, psnr, ((out - reference).norm() / reference.norm()).item())


def _int8_rows(args, fp32_model, int8_model, inputs):
    """([(run, its dtype, ms)] for fastdiff int8 and fastdiff fp32, timed round by round, Int8Accuracy):
    `fp32_model` beside `int8_model`, a float copy of it that is quantized here."""
    names = quantize(int8_model, conv3x3=args.int8_conv3x3)
    with torch.inference_mode():  # also each model's first call (weight packing), before the timed rounds
        accuracy = _int8_accuracy(int8_model(*inputs), fp32_model(*inputs), len(names))
    label = f"fastdiff int8 ({'linear, 1x1 and 3x3 conv' if args.int8_conv3x3 else 'linear, 1x1 conv'})"
    times = interleaved_ms({label: lambda: int8_model(*inputs), "fastdiff fp32": lambda: fp32_model(*inputs)},
                           warmup=0, repeats=args.repeats, budget_s=2 * args.budget_s)
    return [(label, "int8", statistics.median(times[label])),
            ("fastdiff fp32", "fp32", statistics.median(times["fastdiff fp32"]))], accuracy


def _sd_rows(args, dtype):
    """(FLOPs of one step, [(run, its dtype, ms)], Int8Accuracy or None): fastdiff beside diffusers and OpenVINO."""
    from diffusers import UNet2DConditionModel

    from fastdiff.models.unet_2d_condition import UNet2DCondition

    config = dict(SD15_CONFIG, in_channels=8 if args.model == "ip2p" else 4)
    side = args.res // 8
    sample = torch.randn(args.batch, config["in_channels"], side, side)
    timestep = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, 768)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    flops = step_flops(reference, sample, timestep, context)
    reference = fill_random(reference)
    time = lambda fn: median_ms(fn, repeats=args.repeats, budget_s=args.budget_s)  # noqa: E731

    sample_cl = sample.contiguous(memory_format=torch.channels_last)

    def time_fastdiff():  # the bf16 copy of the weights lives only while it is timed (fp32 shares diffusers')
        fast = UNet2DCondition.from_diffusers(reference, dtype=dtype)
        fast_sample, fast_context = sample_cl.to(dtype), context.to(dtype)
        return time(lambda: fast(fast_sample, timestep, fast_context))

    accuracy = None
    if args.dtype == "int8":  # both fastdiff models live only while they run
        results, accuracy = _int8_rows(args, UNet2DCondition.from_diffusers(reference), UNet2DCondition.from_diffusers(reference),
                                       (sample_cl, timestep, context))
    else:
        results = [(f"fastdiff {args.dtype}", args.dtype, time_fastdiff())]
    results.append(("diffusers eager fp32", "fp32", time(lambda: reference(sample, timestep, context))))

    reference_cl = reference.to(memory_format=torch.channels_last)

    def autocast_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return reference_cl(sample_cl, timestep, context)

    results.append(("diffusers bf16 autocast channels_last", "bf16", time(autocast_bf16)))
    if not args.no_openvino:
        for ov_dtype in ("fp32", "bf16"):
            runner = _openvino_runner(reference, (sample, timestep, context), ov_dtype)
            if runner is None:
                break
            results.append((f"OpenVINO {ov_dtype}", ov_dtype, time(runner)))
    return flops, results, accuracy


def _mobilediffusion_rows(args, dtype):
    """(FLOPs of one step, [(run, its dtype, ms)], Int8Accuracy or None): fastdiff beside its
    reference backend and OpenVINO (with --dtype int8: the fp32 module's)."""
    from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

    config = MobileDiffusionConfig.from_preset(args.preset, sample_size=args.res // 8)
    side = args.res // 8
    sample = torch.randn(args.batch, config.in_channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    timestep = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, config.cross_attention_dim).to(dtype)
    with torch.device("meta"):
        model = MobileDiffusionUNet(config)
    flops = step_flops(model, sample, timestep, context)
    model = fill_random(model).to(dtype)
    step = lambda: model(sample, timestep, context)  # noqa: E731
    time = lambda fn: median_ms(fn, repeats=args.repeats, budget_s=args.budget_s)  # noqa: E731
    accuracy = None
    if args.dtype == "int8":
        results, accuracy = _int8_rows(args, model, copy.deepcopy(model), (sample, timestep, context))
    else:
        results = [(f"fastdiff {args.dtype}", args.dtype, time(step))]
    float_name = "fp32" if args.dtype == "int8" else args.dtype  # the baselines run the float module
    with ops.use_backend("reference"):
        results.append((f"fastdiff {float_name}, reference backend", float_name, time(step)))
    if not args.no_openvino:
        with ops.use_backend("reference"):  # OpenVINO traces plain PyTorch ops
            runner = _openvino_runner(model.float(), (sample.float(), timestep, context.float()), float_name)
        if runner is not None:
            results.append((f"OpenVINO {float_name} (same module)", float_name, time(runner)))
    return flops, results, accuracy


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.res % 64:
        raise ValueError(f"--res: expected a multiple of 64, got {args.res}")
    if args.preset != "mobilediffusion" and args.model != "mobilediffusion":
        raise ValueError(f"--preset: only for --model mobilediffusion, got --model {args.model}")
    if args.int8_conv3x3 and args.dtype != "int8":
        raise ValueError(f"--int8-conv3x3: only with --dtype int8, got --dtype {args.dtype}")
    dtype = _DTYPES.get(args.dtype, torch.float32)  # int8: fp32 activations
    backend = ops.selected_name("cpu")
    print(f"UNet step: {args.model} at {args.res}x{args.res}, batch {args.batch}, fastdiff {args.dtype} on the {backend} "
          f"backend, {torch.get_num_threads()} threads; median of {args.repeats}; speedup = baseline / fastdiff")
    with torch.no_grad():  # not inference_mode: weights made in it would be packed again on every call
        flops, results, accuracy = (_mobilediffusion_rows if args.model == "mobilediffusion" else _sd_rows)(args, dtype)
    peaks = {name: compute_peak(_DTYPES[name]) for name in dict.fromkeys(d for _, d, _ in results) if name in _DTYPES}
    print(f"{flops / 1e9:.4g} GFLOP per step (fastdiff.models.flops); % of peak against "
          + "; ".join(f"{p.rate:.0f} GFLOP/s {name} ({p.how})" for name, p in peaks.items())
          + ("; none for int8 (no int8 peak is measured)" if accuracy is not None else ""))
    fast_ms = results[0][2]
    rows = [[run_name, f"{ms:.0f}", "-" if i == 0 else f"{ms / fast_ms:.2f}x", f"{flops / ms / 1e6:.3g}",
             peaks[dtype_name].percent(flops / ms / 1e6) if dtype_name in peaks else "-"]
            for i, (run_name, dtype_name, ms) in enumerate(results)]
    print(format_table(["run", "ms / step", "fastdiff speedup", "GFLOP/s", "% of peak"], rows))
    int8_report = None
    if accuracy is not None:
        ratio = fast_ms / results[1][2]
        target = f" (issue 21's target for SD1.5: <= {INT8_TARGET}: {'met' if ratio <= INT8_TARGET else 'not met'})"
        print(f"int8 / fp32 step time: {ratio:.2f}{target if args.model == 'sd15' else ''}")
        print(f"int8 output against fp32 on the same inputs ({accuracy.layers} layers int8): PSNR {accuracy.psnr_db:.1f} dB "
              f"(peak = max |fp32 output|), relative L2 error {accuracy.relative_l2:.3g}")
        int8_report = {"conv3x3": args.int8_conv3x3, "time_ratio": ratio, **dataclasses.asdict(accuracy)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "res": args.res, "batch": args.batch, "dtype": args.dtype, "backend": backend,
                       "threads": torch.get_num_threads(), "flops": flops,
                       "peaks": {name: dataclasses.asdict(p) for name, p in peaks.items()},
                       "rows": [{"run": n, "dtype": d, "ms": ms,
                                 "percent_of_peak": 100 * flops / ms / 1e6 / peaks[d].rate if d in peaks else None}
                                for n, d, ms in results],
                       "int8": int8_report}, f, indent=2)
    return 0
