"""Pipeline table: a whole diffusers StableDiffusionPipeline, plain and through fastdiff.accelerate.

SD1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder, configs written below) with random
weights, nothing downloaded; a stand-in tokenizer (token ids are all the text encoder needs).
Text to image at --res, --steps PNDM steps (SD1.5's scheduler config), guidance 7.5, batch 1, end
to end (prompt to decoded np image). Three runs, interleaved in every round so load on the
machine hits them alike: plain fp32, fastdiff.accelerate(dtype bf16) (UNet and VAE on fastdiff;
text encoder and scheduler stay diffusers'/transformers'), and plain under torch.autocast bf16. Each
run is warmed up once with a 1-step 64x64 call (weight packing) before the first round.
Speedup = plain fp32 median / run median.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from fastdiff.bench.timing import elapsed_ms, format_table
from fastdiff.bench.unet import SD15_CONFIG, fill_random

# stable-diffusion-v1-5's vae/config.json and scheduler/scheduler_config.json
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, act_fn="silu",
)
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None}
# openai/clip-vit-large-patch14's text config (SD1.5's text encoder)
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                        num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
PROMPT = "a photograph of an astronaut riding a horse"
TARGET = 2.3  # issue 8: accelerated bf16 >= 2.3x plain fp32, end to end


def _stand_in_tokenizer(folder: Path):
    """A CLIPTokenizer over lowercase letters (BPE files written here): real CLIP's vocabulary
    would need a download, and tokenizing is microseconds either way."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_pipelines():
    """(plain, accelerated): two StableDiffusionPipelines sharing the text encoder and tokenizer;
    the plain one keeps diffusers' fp32 UNet/VAE, the other gets fastdiff's bf16 ones."""
    import diffusers
    import transformers

    import fastdiff

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_CONFIG)
        vae = diffusers.AutoencoderKL(**SD15_VAE_CONFIG)
    unet, vae = fill_random(unet, seed=0), fill_random(vae, seed=1)
    torch.manual_seed(2)  # built normally: its position-id buffer is not in the state_dict fill_random fills
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = _stand_in_tokenizer(Path(folder))
    pipes = []
    for _ in range(2):
        pipe = diffusers.StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes[0], fastdiff.accelerate(pipes[1], dtype="bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--res", type=int, default=512, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs the three pipelines once (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the per-round times as JSON")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(args) -> int:
    for name in ("res", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.res % 64:
        raise ValueError(f"--res: expected a multiple of 64, got {args.res}")
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = torch.backends.cpu.get_cpu_capability()
    print(f"StableDiffusionPipeline (SD1.5 architecture, random weights), {args.res}x{args.res}, {args.steps} PNDM steps, "
          f"batch 1, guidance 7.5, end to end; {_cpu_name()}, torch CPU capability {caps}, {torch.get_num_threads()} threads; "
          f"{args.rounds} interleaved round(s), median; speedup = plain fp32 / run", flush=True)
    plain, fast = build_pipelines()

    def call(pipe, steps, res):
        return pipe(PROMPT, height=res, width=res, num_inference_steps=steps, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    def autocast(steps, res):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(plain, steps, res)

    # bf16 autocast last in each round: on CPUs without AVX-512 BF16 it is by far the slowest
    runs = {"plain fp32": lambda steps, res: call(plain, steps, res),
            "fastdiff.accelerate bf16": lambda steps, res: call(fast, steps, res), "plain bf16 autocast": autocast}
    for fn in runs.values():
        fn(1, 64)  # warm-up: packs every weight once; 64 px keeps it cheap
    times = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(elapsed_ms(lambda: fn(args.steps, args.res)) / 1e3)
            print(f"round {round_ + 1}/{args.rounds}: {name}: {times[name][-1]:.1f} s", flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["plain fp32"]
    rows = [[name, f"{s:.1f}", f"{s / args.steps:.2f}", f"{base / s:.2f}x"] for name, s in medians.items()]
    print(format_table(["run", "s / image", "s / step", "speedup vs plain fp32"], rows))
    achieved = base / medians["fastdiff.accelerate bf16"]
    print(f"target: accelerated bf16 >= {TARGET}x plain fp32: {achieved:.2f}x, {'met' if achieved >= TARGET else 'missed'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"res": args.res, "steps": args.steps, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                       "capability": caps, "seconds": times}, f, indent=2)
    return 0
