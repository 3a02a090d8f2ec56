"""fastdiff's default models, usable on a fresh machine with nothing downloaded. Point fastdiff at
other weights with FASTDIFF_MODEL=DIR / model=DIR (a diffusers folder).

    "toyworld"          the default: TRAINED on fastdiff.toyworld (`make train-default`), loaded from
                        the package's weights/generate (a 128x128 MobileDiffusion "toyworld" UNet,
                        v-prediction, 20 Euler steps) and weights/edit (an InstructPix2Pix-style
                        editor with its own text encoder); it draws the toy world's captions
                        ("a big red circle at the top left on a white background") and edits
                        ("make the circle blue"), nothing else

The others are UNTRAINED, seeded random weights: their images are noise; they exist for timing.

    "mobilediffusion"   the paper-size MobileDiffusion UNet (386M parameters), one-step x0 mode,
                        a 3-channel VAE and a CLIP ViT-L/14-sized text encoder: 512x512 images;
                        text-to-image decodes with a TAESD-size AutoencoderTiny (vae="kl": the KL VAE)
    "small"             the same architectures at test size: 128x128 images in milliseconds
    editor ("edit")     a small InstructPix2Pix-style UNet (6 input channels: noisy latent + image
                        latent) sharing the VAE and text encoder, Euler ancestral, 3-way guidance

The untrained text encoders' tokenizer is character-level (CLIP's byte alphabet, no merges):
real CLIP vocabularies come with real weights.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from fastdiff.pipeline import Pipeline
from fastdiff.quantization import check_quantize
from fastdiff.requests import Defaults, PipelineError

SEED = 0
LABEL = "UNTRAINED random weights (seed 0): images are noise; load real weights with model=DIR"
TRAINED = "toyworld"
WEIGHTS = Path(__file__).parent / "weights"  # TRAINED's folders: generate/, edit/ (written by `make train-default`)

# SD1.5's noise schedule (MobileDiffusion and InstructPix2Pix train on the same one).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}

SIZES = {
    # text encoder (CLIP), VAE, MobileDiffusion preset, editor UNet widths
    "mobilediffusion": dict(text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                            vae=(64, 128, 256, 256), tiny_vae=dict(),  # tiny_vae: TAESD's own sizes
                            unet_preset="mobilediffusion", unet_changes={},
                            editor=dict(block_out_channels=(128, 256, 256), attention_head_dim=8, norm_num_groups=32)),
    "small": dict(text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
                  vae=(32, 32, 32, 32),
                  tiny_vae=dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                                num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4),
                  unet_preset="tiny", unet_changes={"text_length": 77},
                  editor=dict(block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=8)),
}


def _char_tokenizer():
    """A CLIPTokenizer over CLIP's byte alphabet with no merges (one token per character)."""
    from transformers import CLIPTokenizer

    from fastdiff.models.text_encoder import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        vocab_size = write_clip_tokenizer(folder)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True), vocab_size


def _text_encoder(sizes, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastdiff.models.text_encoder import CLIPTextEncoder

    tokenizer, vocab_size = _char_tokenizer()
    ids = tokenizer.convert_tokens_to_ids([tokenizer.bos_token, tokenizer.eos_token])
    config = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=ids[0], eos_token_id=ids[1],
                            pad_token_id=ids[1], **sizes)
    return CLIPTextEncoder(CLIPTextModel(config).to(dtype), tokenizer)


def _vae(widths, dtype):
    from fastdiff.models.vae import AutoencoderKL

    n = len(widths)
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, latent_channels=3, layers_per_block=1,
                         norm_num_groups=min(32, widths[0]), scaling_factor=0.18215).to(dtype).eval()


def _tiny_vae(fields, dtype):
    from fastdiff.models.autoencoder_tiny import AutoencoderTiny

    return AutoencoderTiny(latent_channels=3, **fields).to(dtype).eval()


MODELS = (TRAINED, *SIZES)  # the names model=/FASTDIFF_MODEL/--model accept besides a folder


def _trained_pipeline(kind: str, dtype: torch.dtype, quantize: str | None) -> Pipeline:
    folder = WEIGHTS / kind
    if not (folder / "model_index.json").is_file():
        raise PipelineError("model", f"the trained default's weights are missing from {folder}; "
                            f"`make train-default` trains and writes them")
    pipe = Pipeline.from_pretrained(folder, dtype=dtype, quantize=quantize)
    pipe.name = f"fastdiff-{TRAINED}-{kind} (trained on fastdiff.toyworld)"
    return pipe


def default_pipeline(kind: str = "generate", size: str = TRAINED, dtype: torch.dtype = torch.float32,
                     vae: str | None = None, quantize: str | None = None) -> Pipeline:
    """A default pipeline (cached): kind "generate" (MobileDiffusion) or "edit" (the editor); size
    "toyworld" (TRAINED, 128x128, from WEIGHTS), or UNTRAINED "mobilediffusion" (paper size,
    512x512) or "small" (128x128, for quick runs); vae (untrained only) "tiny" (AutoencoderTiny,
    text-to-image's default) or "kl" (AutoencoderKL, the editor's: its UNet takes the KL VAE's
    unscaled image latents); the trained models have their own KL VAE. quantize: None or "int8"
    (Pipeline.quantize: the UNet's linear and 1x1 convolution weights)."""
    return _default_pipeline(kind, size, dtype, vae, check_quantize(quantize))  # one cache key per pipeline


@functools.lru_cache(maxsize=4)
def _default_pipeline(kind: str, size: str, dtype: torch.dtype, vae: str | None, quantize: str | None) -> Pipeline:
    if kind not in ("generate", "edit"):
        raise ValueError(f"kind: expected 'generate' or 'edit', got {kind!r}")
    if size not in MODELS:
        raise ValueError(f"size: expected one of {list(MODELS)}, got {size!r}")
    if size == TRAINED:
        if vae is not None:
            raise ValueError(f"vae: the {TRAINED} models have their own VAE, got {vae!r}")
        return _trained_pipeline(kind, dtype, quantize)
    vae = vae or ("tiny" if kind == "generate" else "kl")
    allowed = ("tiny", "kl") if kind == "generate" else ("kl",)
    if vae not in allowed:
        raise ValueError(f"vae: expected one of {allowed} for kind {kind!r}, got {vae!r}")
    sizes = SIZES[size]
    torch.manual_seed(SEED)
    text_encoder = _text_encoder(sizes["text"], dtype)
    vae = _tiny_vae(sizes["tiny_vae"], dtype) if vae == "tiny" else _vae(sizes["vae"], dtype)
    if kind == "generate":
        from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

        config = MobileDiffusionConfig.from_preset(sizes["unet_preset"], **sizes["unet_changes"])
        config = config.replace(cross_attention_dim=text_encoder.hidden_size)
        unet = MobileDiffusionUNet(config).to(dtype).eval()
        # MobileDiffusion's distilled one-step mode: x0 from pure noise, no guidance.
        defaults = Defaults(steps=1, guidance_scale=1.0, sampler="x0", size=config.sample_size * vae.config.downscale)
        scheduler = {"_class_name": "EulerDiscreteScheduler", **SD_SCHEDULE}
    else:
        from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig

        widths = sizes["editor"]["block_out_channels"]
        n = len(widths)
        config = UNet2DConditionConfig(
            in_channels=6, out_channels=3, block_out_channels=widths, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=text_encoder.hidden_size, attention_head_dim=sizes["editor"]["attention_head_dim"],
            norm_num_groups=sizes["editor"]["norm_num_groups"],
        )
        unet = UNet2DCondition(config).to(dtype).eval()
        # InstructPix2Pix/MGIE's guidance and sampler; fewer steps than their 100 so a CPU demo stays short.
        defaults = Defaults(steps=20, guidance_scale=7.5, image_guidance_scale=1.5, sampler=None,
                            size=64 * vae.config.downscale if size == "mobilediffusion" else 128)
        scheduler = {"_class_name": "EulerAncestralDiscreteScheduler", **SD_SCHEDULE}
    name = f"fastdiff-default-{'mobilediffusion' if kind == 'generate' else 'editor'}{'-small' if size == 'small' else ''} ({LABEL})"
    pipe = Pipeline(unet=unet, vae=vae, scheduler_config=scheduler, text_encoder=text_encoder, defaults=defaults, name=name)
    if quantize:
        pipe.quantize(quantize)
    return pipe


default_pipeline.cache_clear = _default_pipeline.cache_clear  # forget every built pipeline
