"""Step caching table: one edit at --steps Euler-ancestral steps, uncached beside cached (DeepCache, issue 20).

Editors (--editors): default, the trained default editor (fastdiff/weights/edit: 128x128, a
3-level SD-style UNet); sd15, InstructPix2Pix's architecture (SD1.5's UNet with 8 input channels,
SD1.5's VAE, a CLIP ViT-L/14-sized text encoder over a character tokenizer) with random weights
(fill_random) at --res. Each edit runs end to end through pipe.edit (text encoding, VAE encode,
--steps steps of 3-way guidance at the editor's default scales, VAE decode) on a random image, seed 0.

Per editor the uncached edit and one edit per (interval, depth) of --cache-interval x
--cache-depth take turns in every round (fastdiff.bench.timing.interleaved_ms), so the machine's
load hits them alike, after one warm-up edit of each at 2 steps. The table gives each run's
median seconds per edit and the speedup uncached / cached, marked against the issue's target
(TARGET_SPEEDUP). What the caching costs in quality: `python -m fastdiff.bench quality
--cache-interval ...`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile

import numpy as np
import torch

import fastdiff.ops as ops
from fastdiff.bench.quality import parse_cache_grid
from fastdiff.bench.timing import format_table, interleaved_ms

TARGET_SPEEDUP = 2.0  # issue 20: an edit at 100 Euler-ancestral steps >= 2x faster with caching than without
EDITORS = ("default", "sd15")
INSTRUCTION = "make the circle blue"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sd15_editor(res: int, dtype: torch.dtype):
    """InstructPix2Pix's architecture with random weights: SD1.5's UNet (8 input channels) and VAE,
    a CLIP ViT-L/14-sized text encoder; Euler ancestral on SD1.5's schedule, `res` pixels."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastdiff.bench.pipeline import SD15_TEXT_CONFIG, SD15_VAE_CONFIG
    from fastdiff.bench.unet import SD15_CONFIG, fill_random
    from fastdiff.default_model import SD_SCHEDULE
    from fastdiff.models.text_encoder import CLIPTextEncoder, write_clip_tokenizer
    from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig
    from fastdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
    from fastdiff.pipeline import Pipeline
    from fastdiff.requests import Defaults

    with torch.device("meta"):
        unet = UNet2DCondition(UNet2DConditionConfig.from_diffusers(dict(SD15_CONFIG, in_channels=8)))
        vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(dict(SD15_VAE_CONFIG, scaling_factor=0.18215)))
    unet = fill_random(unet, seed=0).to(dtype=dtype, memory_format=torch.channels_last)
    vae = fill_random(vae, seed=1).to(dtype=dtype, memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as folder:
        vocab_size = write_clip_tokenizer(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer.convert_tokens_to_ids([tokenizer.bos_token, tokenizer.eos_token])
    sizes = {k: v for k, v in SD15_TEXT_CONFIG.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id",
                                                                     "pad_token_id")}
    torch.manual_seed(2)  # built normally: its position-id buffer is not in the state_dict fill_random fills
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=ids[0], eos_token_id=ids[1],
                                        pad_token_id=ids[1], **sizes)).to(dtype)
    return Pipeline(unet=unet, vae=vae, text_encoder=CLIPTextEncoder(text, tokenizer),
                    scheduler_config={"_class_name": "EulerAncestralDiscreteScheduler", **SD_SCHEDULE},
                    defaults=Defaults.for_model(editor=True, size=res),
                    name="InstructPix2Pix architecture (SD1.5 UNet, 8 channels), random weights")


def build_editor(name: str, res: int, dtype: torch.dtype):
    from fastdiff.default_model import default_pipeline

    return default_pipeline("edit", dtype=dtype) if name == "default" else sd15_editor(res, dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--editors", default="default",
                        help=f"comma-separated, of {', '.join(EDITORS)} (sd15 at 512: minutes per step on a small CPU)")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps per edit (default 100, the issue's)")
    parser.add_argument("--sampler", default="euler_ancestral", help="sampler (default euler_ancestral, the issue's)")
    parser.add_argument("--cache-interval", default="2,3,5", metavar="N,...",
                        help="cache_interval values, each timed beside the uncached edit (default 2,3,5)")
    parser.add_argument("--cache-depth", default="1", metavar="D,...", help="cache_depth values (default 1)")
    parser.add_argument("--res", type=int, default=512, help="sd15's image side in pixels (a multiple of 64)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="every editor's weights and activations")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per editor (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write every round's seconds as JSON")


def _checked(args) -> tuple[list[str], tuple[tuple[int, int], ...]]:
    editors = [name.strip() for name in args.editors.split(",") if name.strip()]
    if not editors or any(name not in EDITORS for name in editors):
        raise ValueError(f"--editors: expected comma-separated names of {list(EDITORS)}, got {args.editors!r}")
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.res < 64 or args.res % 64:
        raise ValueError(f"--res: expected a positive multiple of 64, got {args.res}")
    grid = parse_cache_grid(args.cache_interval, args.cache_depth)
    if not grid:
        raise ValueError(f"--cache-interval: expected an interval above 1 (1 is the uncached edit), got {args.cache_interval!r}")
    return editors, grid


def _label(cache) -> str:
    return "uncached" if cache is None else "cache {}/{}".format(*cache)


def time_editor(pipe, grid, *, steps: int, sampler: str, rounds: int) -> dict[str, list[float]]:
    """{run label: seconds of each round} for the uncached edit and each (interval, depth) of `grid`,
    interleaved round by round after a 2-step warm-up edit of each."""
    side = pipe.defaults.size
    image = np.random.default_rng(0).random((side, side, 3))
    for _, depth in grid:
        if depth > pipe.unet.max_cache_depth:
            raise ValueError(f"--cache-depth: expected at most {pipe.unet.max_cache_depth} for {pipe.name}, got {depth}")

    def edit(cache, edit_steps):
        options = {} if cache is None else {"cache_interval": cache[0], "cache_depth": cache[1]}
        return lambda: pipe.edit(image, INSTRUCTION, steps=edit_steps, sampler=sampler, seed=0, output_type="np",
                                 progress=False, **options)

    runs = [None, *grid]
    with torch.inference_mode():
        for cache in runs:  # first-call costs (weight packing, allocations) outside the timed rounds
            edit(cache, 2)()
    times = interleaved_ms({_label(cache): edit(cache, steps) for cache in runs}, warmup=0, repeats=rounds,
                           budget_s=math.inf)
    return {label: [ms / 1e3 for ms in values] for label, values in times.items()}


def run(args) -> int:
    editors, grid = _checked(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    print(f"step caching: one edit, {args.steps} {args.sampler} steps, 3-way guidance, end to end; {args.dtype}, "
          f"{ops.selected_name('cpu')} backend, {torch.get_num_threads()} threads; {args.rounds} interleaved round(s), "
          f"median; speedup = uncached / cached", flush=True)
    rows, report = [], []
    for name in editors:
        pipe = build_editor(name, args.res, dtype)
        print(f"{name}: {pipe.name}, {pipe.defaults.size}x{pipe.defaults.size}", flush=True)
        times = time_editor(pipe, grid, steps=args.steps, sampler=args.sampler, rounds=args.rounds)
        medians = {label: statistics.median(seconds) for label, seconds in times.items()}
        uncached = medians["uncached"]
        for label, seconds in medians.items():
            speedup = uncached / seconds
            mark = "-" if label == "uncached" else f"{speedup:.2f}x {'ok' if speedup >= TARGET_SPEEDUP else 'MISS'}"
            rows.append([name, label, f"{seconds:.2f}", mark])
        report.append({"editor": name, "model": pipe.name, "size": pipe.defaults.size, "seconds": times,
                       "median_s": medians})
        del pipe  # sd15's 4 GB of weights go before the next editor is built
    print(format_table(["editor", "run", "s / edit", f"speedup >={TARGET_SPEEDUP:g}x"], rows))
    print("(cache N/depth: cache_interval/cache_depth; the rows of one editor ran interleaved in the same rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "sampler": args.sampler, "dtype": args.dtype, "res": args.res,
                       "threads": torch.get_num_threads(), "backend": ops.selected_name("cpu"), "editors": report},
                      f, indent=2)
    return 0
