"""Validation against the reference twins: the one tolerance table, the error metric, the comparison.

Used by the test suite (tests/helpers.py) and by `fastdiff validate`. A kernel's output is
compared with its reference twin evaluated in float64 on the same rounded inputs:
‖out − ref‖ / ‖ref‖ ≤ 1e-5 in fp32; in bf16/fp16 at most twice torch's own error for the same
computation in that dtype, with a floor. Outputs are poisoned with NaN before each run, so
elements a kernel never writes show up as NaN.
"""
from __future__ import annotations

import dataclasses

import torch

import fastdiff.ops as ops
from fastdiff import shapes
from fastdiff.ops import reference

FP32_BOUND = 1e-5
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


@dataclasses.dataclass
class Comparison:
    op: str
    backend: str
    dtype: torch.dtype
    error: float
    bound: float
    problem: str | None  # why it failed beyond the error (NaN, wrong shape or dtype), else None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.error <= self.bound

    def describe(self) -> str:
        what = self.problem or f"relative error {self.error:.3e} {'<=' if self.passed else '>'} bound {self.bound:.3e}"
        return f"{self.op} [{self.backend}, {str(self.dtype).removeprefix('torch.')}]: {what}"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def default_cast(value, dtype, device):
    return value.to(device=device, dtype=dtype) if isinstance(value, torch.Tensor) else value


def compare(op: str, args: tuple, kwargs: dict, backend: str, dtype: torch.dtype, *, device="cpu", cast=None):
    """Run ops.<op> on `backend` in `dtype` against reference.<op> in float64.

    args: float64 CPU tensors (or None / plain values); `cast(value, dtype, device)` may replace
    the plain cast, e.g. to make strided views or channels_last inputs. Returns (output, Comparison).
    """
    cast = cast or default_cast
    low = tuple(cast(a, dtype, device) for a in args)
    truth = getattr(reference, op)(*(default_cast(a, torch.float64, "cpu") for a in low), **kwargs)
    with ops.use_backend(backend), ops.poison_outputs():
        out = getattr(ops, op)(*low, **kwargs)
    if dtype == torch.float32:
        bound = FP32_BOUND
    else:
        torch_error = rel_error(getattr(reference, op)(*low, **kwargs), truth)
        bound = max(LOW_PRECISION_FACTOR * torch_error, LOW_PRECISION_FLOOR[dtype])
    problem = None
    if out.dtype != dtype:
        problem = f"output dtype {out.dtype}, expected {dtype}"
    elif out.shape != truth.shape:
        problem = f"output shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    elif not torch.isfinite(out).all():
        problem = "output has NaN/inf (unwritten or overflowed elements)"
    error = rel_error(out, truth) if problem is None else float("nan")
    return out, Comparison(op, backend, dtype, error, bound, problem)


def _channels_last(value, dtype, device):
    """default_cast, with feature maps (4-D, not the 3x3 / 1x1 conv weights) in channels_last."""
    value = default_cast(value, dtype, device)
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2:] != (3, 3) and value.shape[2:] != (1, 1):
        return value.contiguous(memory_format=torch.channels_last)
    return value


def kernel_cases(size: str = shapes.QUICK, *, seed: int = 0):
    """(label, op, args (float64), kwargs, cast) for every case of fastdiff.shapes at `size`: the real
    models' cases in channels_last (the layout they run in), the odd ones in NCHW."""
    for case in shapes.cases(size=size):
        args, kwargs = case.inputs(seed=seed)
        cast = _channels_last if case.model != shapes.ODD else None
        yield f"{case.name} {case.label}", case.op, args, kwargs, cast


def _tiny_diffusers_models():
    """Small random diffusers UNet (8 input channels, InstructPix2Pix-style) and VAE, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return unet.eval(), vae.eval()


def unet_class(folder) -> str:
    """The UNet class a pipeline folder's unet/config.json names; PipelineError when the folder is
    not a pipeline folder (checked before any long run)."""
    import json
    from pathlib import Path

    from fastdiff.requests import PipelineError

    config = Path(folder) / "unet" / "config.json"
    try:
        return json.loads(config.read_text()).get("_class_name", "UNet2DConditionModel")
    except (OSError, ValueError) as exc:
        raise PipelineError("--model", f"{str(folder)!r} is not a pipeline folder with unet/config.json ({exc})") from None


def compare_models(folder=None, backends=("reference", "cpp")) -> list[dict]:
    """fastdiff's UNet and VAE against diffusers' on the same weights and random inputs.

    folder: a diffusers pipeline folder (its unet/ and vae/), or None for small random models. A
    MobileDiffusion UNet (which diffusers cannot build) is checked against fastdiff's reference
    backend (plain PyTorch ops) in fp32 instead, on the fast backends only. fp32: relative error
    <= 1e-4; bf16: at most 2x the reference's own bf16 error (diffusers' under autocast, or
    fastdiff's reference backend in bf16), floor 1e-2.
    Returns rows (model, backend, dtype, error, bound, passed).
    """
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    from fastdiff.models.unet_2d_condition import UNet2DCondition
    from fastdiff.models.vae import AutoencoderKL

    mobile = folder is not None and unet_class(folder) == "MobileDiffusionUNet"
    if folder is None:
        d_unet, d_vae = _tiny_diffusers_models()
        size = 16
    else:
        d_unet = None if mobile else UNet2DConditionModel.from_pretrained(f"{folder}/unet").eval()
        d_vae = DiffusersVAE.from_pretrained(f"{folder}/vae").eval()
        size = 32  # latent side: small enough for a CPU check
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, d_vae.config.latent_channels, size, size, generator=generator)
    runs = {"vae decode": (lambda m, dt: m.decode(latents.to(dt)), lambda: d_vae.decode(latents).sample,
                           lambda dt: AutoencoderKL.from_diffusers(d_vae, dtype=dt))}
    if mobile:
        from pathlib import Path

        from fastdiff.loading import load_unet

        unet = {dtype: load_unet(Path(folder) / "unet", dtype=dtype)[0] for dtype in (torch.float32, torch.bfloat16)}
        c = unet[torch.float32].config
        side = min(size, c.sample_size)
        sample = torch.randn(1, c.in_channels, side, side, generator=generator)
        context = torch.randn(1, c.text_length, c.cross_attention_dim, generator=generator)
        t = torch.tensor([500])

        def reference_run(dtype=torch.float32):
            with ops.use_backend("reference"):
                return unet[dtype](sample.to(dtype), t, context.to(dtype)).double()

        runs["unet (MobileDiffusion)"] = (lambda m, dt: m(sample.to(dt), t, context.to(dt)), reference_run,
                                          lambda dt: unet[dt])
    else:
        c = d_unet.config
        sample = torch.randn(1, c.in_channels, size, size, generator=generator)
        context = torch.randn(1, 77, c.cross_attention_dim, generator=generator)
        runs["unet"] = (lambda m, dt: m(sample.to(dt), 500, context.to(dt)), lambda: d_unet(sample, 500, context).sample,
                        lambda dt: UNet2DCondition.from_diffusers(d_unet, dtype=dt))
    rows = []
    with torch.no_grad():  # not inference_mode: the bf16 copies made in it would be packed again on every call
        for name, (run_fast, run_ref, build) in sorted(runs.items(), key=lambda item: not item[0].startswith("unet")):
            ref = run_ref().double()
            if name.startswith("unet (MobileDiffusion)"):
                own_bf16_error = rel_error(run_ref(torch.bfloat16), ref)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    own_bf16_error = rel_error(run_ref(), ref)
            for dtype in (torch.float32, torch.bfloat16):
                model = build(dtype)
                bound = 1e-4 if dtype == torch.float32 else max(2 * own_bf16_error, 1e-2)
                for backend in backends:
                    if ops.backends()[backend] != "available" or (backend == "reference" and name.startswith("unet (Mobile")):
                        continue  # (the reference backend is that check's yardstick)
                    with ops.use_backend(backend):
                        error = rel_error(run_fast(model, dtype), ref)
                    rows.append({"model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
                                 "error": error, "bound": bound, "passed": error <= bound})
    return rows
