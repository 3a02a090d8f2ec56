"""Train fastdiff's default models on the toy world (fastdiff.toyworld), on this CPU, from scratch.

    python -m fastdiff.train all  [--work train-runs] [--out fastdiff/weights]   (make train-default)

Stages, each seeded and resumable (a stage folder holds state.pt, loss.csv and loss.png; run the
same command again to continue where it stopped; a finished stage is skipped):

    tokenizer   a CLIP BPE tokenizer (vocab.json + merges.txt) whose tokens are the world's words
    vae         AutoencoderKL, 3-channel latent, 8x down (128x128 -> 16x16x3), trained on 64x64
                crops (fully convolutional: no mid-block attention); L1 + L2 + a small KL term +
                the latent mean anchored to an opponent-colour thumbnail (colours kept apart)
    decoder     the VAE's decoder fine-tuned on whole images with the encoder frozen (the latents,
                and so the UNets trained on them, stay valid: SD's ft-MSE decoder recipe)
    generate    a MobileDiffusionUNet ("toyworld" preset: every design choice of the paper on)
                and a CLIP text encoder, jointly, on (caption, image latent) pairs; v-prediction,
                10% empty captions for classifier-free guidance; a curriculum: the first
                CURRICULUM_FRACTION of its steps on one shape on white, then the whole world
    edit        an InstructPix2Pix-style UNet2DCondition (6 input channels: noisy latent + source
                image latent) and its own text encoder on edit triplets; 5% empty instruction,
                5% no image, 5% neither (InstructPix2Pix's dropout for 3-way guidance)
    export      the EMA weights as two diffusers-layout folders (out/generate, out/edit), fp16
                safetensors, read back by Pipeline.from_pretrained
    curve       (not part of `all`) learning curves: the EMA snapshots the generate and edit
                stages keep every SNAPSHOT_EVERY steps, judged on the quality bench's quick
                held-out samples (work/curve.json, work/curve.csv)
    check       the conditioning check (not part of `all`; minutes): a fresh generator and text
                encoder on one-circle scenes whose only variable is the colour the caption names,
                then held-out samples judged: does the caption reach the image? Exit code 1 below
                CHECK_TARGET colour accuracy. Uses the work folder's tokenizer and VAE when those
                stages are finished, else the shipped default's.

The UNet stages train on cached latents: each stage's scenes (or edits) are drawn, rendered and
VAE-encoded once, seeded, into work/cache/ (reused on resume, rebuilt when the VAE changes), so a
training step runs only the text encoder and the UNet; every stage reports the GFLOP/s its steps
achieve (3 forward passes' worth of FLOPs a step).

`all` runs tokenizer and vae, then generate, edit and decoder side by side (one thread each:
small models keep two cores busier side by side than one at a time on two threads), then export. Training is plain
PyTorch autograd on the reference backend, fp32 (this CPU has no bf16 fast path); the data of step
k depends only on (seed, stage, k), so a resumed run sees what an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff import hardware, ops, toyworld

STAGES = ("tokenizer", "vae", "generate", "edit", "decoder", "export", "check", "curve")  # order fixes step_generator seeds
TEXT_LENGTH = 32  # tokens: the longest caption is 24
SEED = 0


@dataclasses.dataclass(frozen=True)
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 100
    ema: float = 0.999


# EMA horizons (1 / (1 - decay)) of ~1/7 of a stage's steps, so the exported average is of late weights.
CONFIGS = {
    "vae": StageConfig(steps=2400, batch=16, lr=1e-3, ema=0.0),
    "generate": StageConfig(steps=7000, batch=32, lr=3e-4, ema=0.999),  # 1e-3 learned colour and cell far slower (BENCHMARKS.md)
    "edit": StageConfig(steps=6000, batch=32, lr=3e-4, ema=0.998),
    "decoder": StageConfig(steps=600, batch=8, lr=3e-4, warmup=50, ema=0.0),
    "check": StageConfig(steps=1800, batch=32, lr=1e-3, warmup=50, ema=0.99),
}
CACHE_SIZES = {"generate": 16384, "generate-first": 8192, "edit": 16384, "check": 2048}  # samples encoded once (at most steps x batch)
# The generator's first steps see one shape on white: there colour and cell words reach the image
# within ~1000 steps, where the whole world (two shapes, any background) took >1500 steps to
# separate the colour words at all (BENCHMARKS.md, issue 17). Then the whole world.
CURRICULUM_FRACTION = 0.2
SNAPSHOT_EVERY = 1000  # the UNet stages keep their EMA weights every this many steps (learning curves)
CHECK_TARGET = 0.95  # held-out colour accuracy the conditioning check must reach
CHECK_SAMPLES = 48
# Classifier-free guidance of the exported generator and the check. At 5 the guided prediction
# overshoots the most extreme latents: a model that draws every colour right at 2 and 3 turned
# green circles near-black at 5 (the check, BENCHMARKS.md).
GUIDANCE = 3.0
TEXT_ENCODER = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=3)
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=3, norm_num_groups=8,
           mid_block_add_attention=False)
# InstructPix2Pix's UNet shape at toy size: no attention at the finest level (as MobileDiffusion)
EDITOR_UNET = dict(block_out_channels=(48, 96, 96), layers_per_block=1, attention_head_dim=4, norm_num_groups=16,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# SD's noise schedule, v-prediction (better than epsilon at few steps and at high noise)
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "clip_sample": False}  # as SD's: DDIM's default clip of x0 to [-1, 1] would cut these latents (std 1, offsets per channel)
VAE_KL_WEIGHT = 1e-4
# The latent's mean is pulled towards an opponent-colour thumbnail of the image (luminance, blue -
# yellow, red - green of each 8x8 cell, x2). Without it the VAE learned a nearly one-dimensional
# colour code (red, orange, yellow and a gray background within 0.2-0.5 of each other in the
# scaled latent: the UNet's colours were then off by a word); with it the palette's closest pair
# is ~1.4 apart and the round trip reads 99 % of colours (BENCHMARKS.md, issue 17).
VAE_ANCHOR_WEIGHT = 0.1


def colour_thumbnail(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 3, H/8, W/8): the VAE latent's anchor."""
    r, g, b = F.avg_pool2d(images, 8).unbind(1)
    return 2 * torch.stack([(r + g + b) / 3, b - (r + g) / 2, r - g], 1)


# -- data -------------------------------------------------------------------------------------------

def step_rng(stage: str, step: int, seed: int = SEED) -> random.Random:
    return random.Random(f"{seed}-{stage}-{step}")


def step_generator(stage: str, step: int, seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, STAGES.index(stage), step)) % 2 ** 62)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode() + tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_latents(work: Path, name: str, vae, count: int, draw) -> dict:
    """`count` training samples of stage `name`, drawn once: sample i is draw(step_rng(name + "-cache",
    i)) -> (text, source scene or None, target scene); both scenes rendered and VAE-encoded (the
    mode: what the pipelines see), the target scaled as the UNet's x0, the source unscaled as an
    editor's image conditioning. Kept in work/cache/<name>-<count>.pt, rebuilt when the VAE differs.
    Returns {"texts": [str], "target": (N, C, h, w), "source": (N, C, h, w) or None}."""
    from tqdm import tqdm

    path = work / "cache" / f"{name}-{count}.pt"
    fingerprint = _fingerprint(vae)
    if path.exists():
        cache = torch.load(path, weights_only=True)
        if cache["vae"] == fingerprint:
            return cache
    samples = [draw(step_rng(f"{name}-cache", i)) for i in range(count)]
    encoded: dict[str, list] = {"target": [], "source": []}
    chunk = 64
    with torch.no_grad():  # on fastdiff's kernels (no backward needed)
        for start in tqdm(range(0, count, chunk), desc=f"{name}: encoding {count} samples once", mininterval=10, file=sys.stdout):
            part = samples[start:start + chunk]
            encoded["target"].append(vae.scale_latents(vae.encode(to_tensor([t.render() for _, _, t in part]))))
            if part[0][1] is not None:
                encoded["source"].append(vae.encode(to_tensor([src.render() for _, src, _ in part])))
    cache = {"texts": [text for text, _, _ in samples], "target": torch.cat(encoded["target"]),
             "source": torch.cat(encoded["source"]) if encoded["source"] else None, "vae": fingerprint}
    _save(path, cache)
    return cache


def _cache_size(stage: str, config: StageConfig, steps: int | None = None) -> int:
    return min(CACHE_SIZES[stage], (config.steps if steps is None else steps) * config.batch)


def cached_batch(cache: dict, generator: torch.Generator, batch: int) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """(texts, target latents, source latents or None) of `batch` samples drawn with `generator`."""
    index = torch.randint(0, len(cache["texts"]), (batch,), generator=generator)
    source = cache["source"][index] if cache["source"] is not None else None
    return [cache["texts"][i] for i in index.tolist()], cache["target"][index], source


# -- models -----------------------------------------------------------------------------------------

def new_text_model(vocab_size: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    bos, eos = tokenizer.convert_tokens_to_ids([tokenizer.bos_token, tokenizer.eos_token])
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=TEXT_LENGTH, bos_token_id=bos,
                                       eos_token_id=eos, pad_token_id=eos, **TEXT_ENCODER))


def new_vae():
    from fastdiff.models.vae import AutoencoderKL

    n = len(VAE["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **VAE)


def new_generator_unet():
    from fastdiff.models.mobilediffusion import MobileDiffusionUNet

    return MobileDiffusionUNet.from_preset("toyworld", cross_attention_dim=TEXT_ENCODER["hidden_size"])


def new_editor_unet():
    from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig

    return UNet2DCondition(UNet2DConditionConfig(in_channels=6, out_channels=3, cross_attention_dim=TEXT_ENCODER["hidden_size"],
                                                 **EDITOR_UNET))


def load_tokenizer(work: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(work / "tokenizer"), local_files_only=True)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt").input_ids


def _done(work: Path, stage: str) -> bool:
    """Whether `stage` has a checkpoint at its configured step count."""
    path = work / stage / "state.pt"
    return path.exists() and torch.load(path, weights_only=True)["step"] >= CONFIGS[stage].steps


def _finished(work: Path, stage: str) -> dict:
    state = torch.load(work / stage / "state.pt", weights_only=True)
    if state["step"] < state["steps"]:
        raise SystemExit(f"the {stage} stage stopped at step {state['step']} of {state['steps']}: run it to the end first")
    return state


def trained_vae(work: Path, *, fine_tuned_decoder: bool = False):
    """The vae stage's result with its latent scaling factor set, frozen; with fine_tuned_decoder,
    the decoder stage's weights (the same encoder)."""
    state = _finished(work, "vae")
    vae = new_vae()
    vae.load_state_dict((_finished(work, "decoder") if fine_tuned_decoder else state)["models"]["vae"])
    vae.config = dataclasses.replace(vae.config, scaling_factor=state["scaling_factor"])
    return vae.eval().requires_grad_(False)


class Schedule:
    """alpha_bar(t) of SCHEDULE, and the v-prediction training pair."""

    def __init__(self):
        betas = torch.linspace(SCHEDULE["beta_start"] ** 0.5, SCHEDULE["beta_end"] ** 0.5,
                               SCHEDULE["num_train_timesteps"], dtype=torch.float64) ** 2
        self.alpha_bar = torch.cumprod(1 - betas, 0).float()

    def noisy(self, x0: torch.Tensor, generator: torch.Generator):
        """(x_t, t, v target) for clean latents x0 (B, C, h, w), t uniform over the train steps."""
        B = x0.shape[0]
        t = torch.randint(0, len(self.alpha_bar), (B,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = self.alpha_bar[t].sqrt().view(B, 1, 1, 1)
        s = (1 - self.alpha_bar[t]).sqrt().view(B, 1, 1, 1)
        return a * x0 + s * noise, t, a * noise - s * x0


# -- training loop ----------------------------------------------------------------------------------

def _lr(config: StageConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """A PNG of the loss curve (log scale, 50-step running mean over the raw losses)."""
    from PIL import Image, ImageDraw

    width, height, pad = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 10), f"{title}: loss (log scale) over {len(losses)} steps", fill="black")
    if len(losses) < 2:
        image.save(path)
        return
    values = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-12))
    window = min(50, len(values))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    low, high = values.min(), values.max()
    x = lambda i, n: pad + (width - 2 * pad) * i / max(1, n - 1)  # noqa: E731
    y = lambda v: height - pad - (height - 2 * pad) * (v - low) / max(1e-9, high - low)  # noqa: E731
    draw.line([(x(i, len(values)), y(v)) for i, v in enumerate(values)], fill=(200, 200, 230))
    offset = window - 1
    draw.line([(x(i + offset, len(values)), y(v)) for i, v in enumerate(smooth)], fill=(30, 60, 200), width=2)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.text((4, pad - 6), f"{10 ** high:.3g}", fill="black")
    draw.text((4, height - pad - 6), f"{10 ** low:.3g}", fill="black")
    draw.text((width - pad - 40, height - pad + 8), f"step {len(values)}", fill="black")
    image.save(path)


def run_stage(name: str, work: Path, models: dict, loss_fn, *, config: StageConfig, checkpoint_every: int = 250,
              flops_per_step: float | None = None, snapshot_every: int = 0) -> dict:
    """Train `models` (name -> module) with AdamW on loss_fn(step) from the stage's last checkpoint
    to config.steps; keeps an EMA of each model when config.ema > 0. With flops_per_step, the
    GFLOP/s the steps achieved are printed and kept in the state ("gflops"). With snapshot_every,
    the EMA weights every that many steps go to work/<name>/snapshots/<step>.pt (with the training
    seconds so far: learning curves). Returns the final state."""
    from tqdm import tqdm

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "state.pt"
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()} if config.ema else {}
    state = {"step": 0, "steps": config.steps, "losses": [], "seconds": 0.0}
    if path.exists():
        state = torch.load(path, weights_only=True)
        for k, m in models.items():
            m.load_state_dict(state["models"][k])
        for k, m in ema.items():
            m.load_state_dict(state["ema"][k])
        optimizer.load_state_dict(state["optimizer"])
        state["steps"] = config.steps
    for m in models.values():
        m.train()
        m.trainable = True

    def checkpoint():
        state.update(models={k: m.state_dict() for k, m in models.items()}, ema={k: m.state_dict() for k, m in ema.items()},
                     optimizer=optimizer.state_dict())
        _save(path, state)
        (folder / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(state["losses"])))
        plot_losses(state["losses"], folder / "loss.png", name)

    bar = tqdm(total=config.steps, initial=state["step"], desc=name, mininterval=10, file=sys.stdout)
    started = time.perf_counter() - state["seconds"]
    first_step, first_second = state["step"], state["seconds"]
    with ops.use_backend("reference"):
        while state["step"] < config.steps:
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            loss = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            decay = min(config.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, m in ema.items():
                    for e, p in zip(m.parameters(), models[k].parameters()):
                        e.lerp_(p, 1 - decay)
            state["losses"].append(loss.item())
            state["step"] = step + 1
            state["seconds"] = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(state['losses'][-50:]):.4f}", refresh=False)
            if flops_per_step and state["step"] > first_step:
                state["gflops"] = flops_per_step * (state["step"] - first_step) / (state["seconds"] - first_second) / 1e9
            if snapshot_every and state["step"] % snapshot_every == 0:
                _save(folder / "snapshots" / f"{state['step']}.pt",
                      {"ema": {k: m.state_dict() for k, m in ema.items()}, "step": state["step"], "seconds": state["seconds"]})
            if state["step"] % checkpoint_every == 0 or state["step"] == config.steps:
                checkpoint()
    bar.close()
    if state.get("gflops"):
        print(f"{name}: {state['gflops']:.1f} GFLOP/s over its training steps ({hardware.cpu_name()}, "
              f"{torch.get_num_threads()} threads)")
    return state


# -- stages -----------------------------------------------------------------------------------------

def stage_tokenizer(work: Path) -> None:
    from fastdiff.models.text_encoder import write_clip_tokenizer

    write_clip_tokenizer(work / "tokenizer", toyworld.vocabulary(), max_length=TEXT_LENGTH)


def stage_vae(work: Path, config: StageConfig) -> None:
    torch.manual_seed(SEED)
    vae = new_vae()
    crop = 64

    def loss_fn(step):
        rng, generator = step_rng("vae", step), step_generator("vae", step)
        images = to_tensor([toyworld.sample_scene(rng).render() for _ in range(config.batch)])
        top, left = (8 * rng.randrange((toyworld.SIZE - crop) // 8 + 1) for _ in range(2))
        images = images[:, :, top:top + crop, left:left + crop]
        mean, logvar = vae.encode_moments(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        out = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return (F.l1_loss(out, images) + F.mse_loss(out, images) + VAE_KL_WEIGHT * kl
                + VAE_ANCHOR_WEIGHT * F.mse_loss(mean, colour_thumbnail(images)))

    state = run_stage("vae", work, {"vae": vae}, loss_fn, config=config)
    if "scaling_factor" not in state:  # 1 / std of the latent modes of 256 fresh scenes (SD's recipe)
        rng = step_rng("vae-scale", 0)
        vae.eval().trainable = False
        z = torch.cat([vae.encode(to_tensor([toyworld.sample_scene(rng).render() for _ in range(32)])) for _ in range(8)])
        state["scaling_factor"] = float(1 / z.std())
        _save(work / "vae" / "state.pt", state)


def stage_decoder(work: Path, config: StageConfig) -> None:
    torch.manual_seed(SEED + 3)
    vae = trained_vae(work)
    vae.requires_grad_(False)
    for part in (vae.decoder, vae.post_quant_conv):
        part.requires_grad_(True)

    def loss_fn(step):
        rng = step_rng("decoder", step)
        images = to_tensor([toyworld.sample_scene(rng).render() for _ in range(config.batch)])
        with torch.no_grad():
            z = vae.encode(images)  # the mode: what the pipelines decode
        out = vae.decode(z)
        return F.l1_loss(out, images) + F.mse_loss(out, images)

    run_stage("decoder", work, {"vae": vae}, loss_fn, config=config)


def _text_dropout(rng: random.Random, texts: list[str], p: float) -> list[str]:
    return ["" if rng.random() < p else t for t in texts]


def _diffusion_parts(work: Path, seed: int, new_unet):
    """(tokenizer, frozen VAE, new text model, new UNet, schedule) of a UNet stage, the models
    initialised from `seed`."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(work)
    vae = trained_vae(work)
    return tokenizer, vae, new_text_model(len(tokenizer), tokenizer), new_unet(), Schedule()


def _caption_sample(scene: toyworld.Scene):
    return scene.caption(), None, scene


def _generator_loss(stage: str, cache: dict, config: StageConfig, text_model, unet, tokenizer, schedule,
                    first: tuple[dict, int] | None = None):
    """The text-to-image step: v-prediction on cached latents, 10% empty captions (for guidance).
    first = (cache, steps): the steps before `steps` draw from that cache instead (a curriculum)."""
    def loss_fn(step):
        rng, generator = step_rng(stage, step), step_generator(stage, step)
        captions, x0, _ = cached_batch(first[0] if first and step < first[1] else cache, generator, config.batch)
        context = text_model(tokenize(tokenizer, _text_dropout(rng, captions, 0.1))).last_hidden_state
        x_t, t, v = schedule.noisy(x0, generator)
        return F.mse_loss(unet(x_t, t, context).float(), v)
    return loss_fn


def _step_flops(text_model, unet, tokenizer, sample: torch.Tensor) -> float:
    """FLOPs of one training step on UNet input `sample` (a batch): forward + backward ~ 3 forward
    passes of the text encoder and the UNet, 2 FLOPs a MAC."""
    from fastdiff.models.flops import count_macs

    ids = tokenize(tokenizer, [""] * len(sample))
    with torch.no_grad():
        hidden = text_model(ids).last_hidden_state
    macs = count_macs(text_model, ids).total + count_macs(unet, sample, torch.zeros(len(sample), dtype=torch.long), hidden).total
    return 3 * 2 * macs


def stage_generate(work: Path, config: StageConfig) -> None:
    tokenizer, vae, text_model, unet, schedule = _diffusion_parts(work, SEED + 1, new_generator_unet)
    first_steps = math.ceil(CURRICULUM_FRACTION * config.steps)
    first = cached_latents(work, "generate-first", vae, _cache_size("generate-first", config, first_steps),
                           lambda rng: _caption_sample(toyworld.sample_scene(rng, max_shapes=1, background=("white",))))
    cache = cached_latents(work, "generate", vae, _cache_size("generate", config), lambda rng: _caption_sample(toyworld.sample_scene(rng)))
    run_stage("generate", work, {"text_encoder": text_model, "unet": unet},
              _generator_loss("generate", cache, config, text_model, unet, tokenizer, schedule, (first, first_steps)),
              config=config, flops_per_step=_step_flops(text_model, unet, tokenizer, cache["target"][:config.batch]),
              snapshot_every=SNAPSHOT_EVERY)


def stage_edit(work: Path, config: StageConfig) -> None:
    tokenizer, vae, text_model, unet, schedule = _diffusion_parts(work, SEED + 2, new_editor_unet)

    def edit_sample(rng):
        edit = toyworld.sample_edit(rng)
        return edit.instruction, edit.source, edit.target

    cache = cached_latents(work, "edit", vae, _cache_size("edit", config), edit_sample)

    def loss_fn(step):
        rng, generator = step_rng("edit", step), step_generator("edit", step)
        instructions, x0, source = cached_batch(cache, generator, config.batch)  # source unscaled, as the pipeline feeds it
        # InstructPix2Pix's dropout: 5% no instruction, 5% no image, 5% neither
        draws = [rng.random() for _ in instructions]
        texts = ["" if d < 0.05 or 0.10 <= d < 0.15 else text for d, text in zip(draws, instructions)]
        keep_image = torch.tensor([not 0.05 <= d < 0.15 for d in draws], dtype=torch.float32).view(-1, 1, 1, 1)
        context = text_model(tokenize(tokenizer, texts)).last_hidden_state
        x_t, t, v = schedule.noisy(x0, generator)
        return F.mse_loss(unet(torch.cat([x_t, source * keep_image], dim=1), t, context).float(), v)

    run_stage("edit", work, {"text_encoder": text_model, "unet": unet}, loss_fn, config=config,
              flops_per_step=_step_flops(text_model, unet, tokenizer,
                                         torch.cat([cache["target"][:config.batch], cache["source"][:config.batch]], dim=1)),
              snapshot_every=SNAPSHOT_EVERY)


def check_scene(rng: random.Random) -> toyworld.Scene:
    """The conditioning check's world: one big circle near the center of a white background; only
    its colour varies, and only the caption says which."""
    color = rng.choice(list(toyworld.SHAPE_COLORS))
    dx, dy = (rng.randint(-toyworld.JITTER, toyworld.JITTER) for _ in range(2))
    return toyworld.Scene((toyworld.Shape("circle", color, "big", 1, 1, dx, dy),), ("white",))


def _check_parts(work: Path):
    """The work folder's tokenizer and VAE when those stages are finished, else the shipped default's."""
    from transformers import CLIPTokenizer

    from fastdiff.default_model import WEIGHTS
    from fastdiff.models.vae import AutoencoderKL

    if (work / "tokenizer").exists() and _done(work, "vae"):
        return load_tokenizer(work), trained_vae(work)
    shipped = WEIGHTS / "generate"
    tokenizer = CLIPTokenizer.from_pretrained(str(shipped / "tokenizer"), local_files_only=True)
    return tokenizer, AutoencoderKL.from_diffusers(shipped / "vae").eval().requires_grad_(False)


def stage_check(work: Path, config: StageConfig) -> dict:
    """Train a fresh generator on check_scene, judge CHECK_SAMPLES held-out samples (new seeds and
    jitter) by colour; writes work/check/result.json and returns it."""
    torch.manual_seed(SEED + 4)
    tokenizer, vae = _check_parts(work)
    text_model, unet, schedule = new_text_model(len(tokenizer), tokenizer), new_generator_unet(), Schedule()
    cache = cached_latents(work, "check", vae, _cache_size("check", config), lambda rng: _caption_sample(check_scene(rng)))
    state = run_stage("check", work, {"text_encoder": text_model, "unet": unet},
                      _generator_loss("check", cache, config, text_model, unet, tokenizer, schedule), config=config,
                      flops_per_step=_step_flops(text_model, unet, tokenizer, cache["target"][:config.batch]))
    pipe = _pipeline("generate", state["ema"], tokenizer, vae)
    held_out = random.Random(f"{SEED}-check-held-out")  # seeds and jitters the cache never drew from
    scenes = [check_scene(held_out) for _ in range(CHECK_SAMPLES)]
    images = pipe.generate([s.caption() for s in scenes], seed=10_000, progress=False)
    colors = [toyworld.judge(image, scene).shapes[0].color for image, scene in zip(images, scenes)]
    accuracy = sum(c == s.shapes[0].color for c, s in zip(colors, scenes)) / len(scenes)
    result = {"colour_accuracy": accuracy, "target": CHECK_TARGET, "steps": state["step"], "batch": config.batch,
              "training_seconds": round(state["seconds"]), "gflops": state.get("gflops"),
              "confusions": sorted({f"{s.shapes[0].color}->{c}" for c, s in zip(colors, scenes) if c != s.shapes[0].color})}
    (work / "check" / "result.json").write_text(json.dumps(result, indent=2))
    print(f"conditioning check: held-out colour {accuracy:.0%} (target {CHECK_TARGET:.0%}) after {state['step']} steps, "
          f"{state['seconds'] / 60:.1f} min of training; wrong: {', '.join(result['confusions']) or 'none'}")
    return result


def _pipeline(kind: str, ema: dict, tokenizer, vae):
    """The `kind` ("generate" or "edit") pipeline of EMA weights {"text_encoder", "unet"}, its defaults as exported."""
    from fastdiff.models.text_encoder import CLIPTextEncoder
    from fastdiff.pipeline import Pipeline
    from fastdiff.requests import Defaults

    if kind == "generate":
        unet, defaults = new_generator_unet(), Defaults(steps=20, guidance_scale=GUIDANCE, size=toyworld.SIZE)
    else:
        unet, defaults = new_editor_unet(), Defaults(steps=20, guidance_scale=5.0, image_guidance_scale=1.5, size=toyworld.SIZE)
    text_model = new_text_model(len(tokenizer), tokenizer)
    text_model.load_state_dict(ema["text_encoder"])
    unet.load_state_dict(ema["unet"])
    return Pipeline(unet=unet.eval(), vae=vae, scheduler_config={"_class_name": "EulerDiscreteScheduler", **SCHEDULE},
                    defaults=defaults, text_encoder=CLIPTextEncoder(text_model.eval(), tokenizer), name=f"toyworld-{kind}")


def stage_export(work: Path, out: Path) -> None:
    """EMA weights -> out/generate and out/edit (diffusers layout, fp16 safetensors)."""
    from safetensors.torch import load_file, save_file

    from fastdiff.loading import save_pipeline

    tokenizer = load_tokenizer(work)
    vae = trained_vae(work, fine_tuned_decoder=True)
    for kind in ("generate", "edit"):
        state = _finished(work, kind)
        folder = out / kind
        save_pipeline(_pipeline(kind, state["ema"], tokenizer, vae), folder)
        for name in ("vocab.json", "merges.txt"):  # CLIP's own format beside transformers' tokenizer.json
            shutil.copyfile(work / "tokenizer" / name, folder / "tokenizer" / name)
        for weights in folder.glob("*/*.safetensors"):
            save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}, str(weights),
                      metadata={"format": "pt"})
        meta = {"trained_steps": state["step"], "training_seconds": round(state["seconds"]),
                **{f"{stage}_training_seconds": round(_finished(work, stage)["seconds"]) for stage in ("vae", "decoder")}}
        (folder / "training.json").write_text(json.dumps(meta, indent=2))


def stage_curve(work: Path) -> list[dict]:
    """Learning curves: every snapshot of the generate and edit stages judged on the quality
    bench's quick held-out samples at the exported defaults (fine-tuned decoder when that stage is
    finished). Writes work/curve.json and work/curve.csv; returns the rows."""
    from tqdm import tqdm

    from fastdiff.bench import quality

    tokenizer = load_tokenizer(work)
    vae = trained_vae(work, fine_tuned_decoder=_done(work, "decoder"))
    scenes, edits = quality.held_out(quality.QUICK)
    rows = []
    for kind in ("generate", "edit"):
        snapshots = sorted((work / kind / "snapshots").glob("*.pt"), key=lambda path: int(path.stem))
        for path in snapshots:
            snapshot = torch.load(path, weights_only=True)
            pipe = _pipeline(kind, snapshot["ema"], tokenizer, vae)
            samples = scenes if kind == "generate" else edits
            with tqdm(total=len(samples), desc=f"{kind} at step {snapshot['step']}", mininterval=10, file=sys.stdout) as bar:
                if kind == "generate":
                    images = quality.generate_images(pipe, scenes, sampler="euler", steps=20, seed=quality.QUICK.seed, bar=bar)
                    figures = quality.generate_figures([toyworld.judge(im, s) for im, s in zip(images, scenes)])
                else:
                    images = quality.edit_images(pipe, edits, sampler="euler", steps=20, seed=quality.QUICK.seed, bar=bar)
                    figures = quality.edit_figures([toyworld.judge_edit(im, e) for im, e in zip(images, edits)])
            figures.pop("by_kind", None)
            rows.append({"stage": kind, "step": snapshot["step"], "minutes": round(snapshot["seconds"] / 60, 1), **figures})
            print(json.dumps(rows[-1]))
    (work / "curve.json").write_text(json.dumps(rows, indent=2))
    columns = ("stage", "step", "minutes", "color", "kind", "position", "background", "all", "success", "preservation")
    (work / "curve.csv").write_text(",".join(columns) + "\n" + "".join(
        ",".join("" if row.get(c) is None else f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + "\n"
        for row in rows))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("all", *STAGES))
    parser.add_argument("--work", type=Path, default=Path("train-runs"), help="checkpoints, loss curves (default train-runs/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights", help="where export writes the folders")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; 1 per stage "
                                                                  "when `all` runs generate and edit side by side)")
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count (quick trials)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    config = lambda name: dataclasses.replace(CONFIGS[name], steps=args.steps or CONFIGS[name].steps)  # noqa: E731
    if args.stage == "all":
        started = time.perf_counter()
        stage_tokenizer(args.work)
        stage_vae(args.work, config("vae"))
        common = ["--work", str(args.work), "--threads", "1"] + (["--steps", str(args.steps)] if args.steps else [])
        children = [subprocess.Popen([sys.executable, "-m", "fastdiff.train", kind, *common])
                    for kind in ("generate", "edit", "decoder")]
        if any(child.wait() for child in children):
            return 1
        stage_export(args.work, args.out)
        print(f"trained and exported to {args.out} in {(time.perf_counter() - started) / 60:.1f} min")
    elif args.stage == "tokenizer":
        stage_tokenizer(args.work)
    elif args.stage == "vae":
        stage_vae(args.work, config("vae"))
    elif args.stage == "generate":
        stage_generate(args.work, config("generate"))
    elif args.stage == "edit":
        stage_edit(args.work, config("edit"))
    elif args.stage == "decoder":
        stage_decoder(args.work, config("decoder"))
    elif args.stage == "check":
        return 0 if stage_check(args.work, config("check"))["colour_accuracy"] >= CHECK_TARGET else 1
    elif args.stage == "curve":
        stage_curve(args.work)
    else:
        stage_export(args.work, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
