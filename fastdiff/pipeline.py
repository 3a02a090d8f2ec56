"""Pipelines: text-to-image `generate` and instruction-based `edit` (InstructPix2Pix / MGIE).

    pipe = fastdiff.Pipeline.from_pretrained("path/to/diffusers-folder", dtype=torch.bfloat16)
    image = pipe.generate("a red bicycle", steps=25, seed=0)[0]
    edited = pipe.edit("in.png", "make it snowy", steps=20, seed=0)

Both follow diffusers' StableDiffusionPipeline / StableDiffusionInstructPix2PixPipeline step for
step (same guidance order, latent scaling and image-latent concatenation), on fastdiff's models;
tests/test_pipeline.py checks the images against diffusers'. Every image is a Job
(fastdiff.jobs) with its own generator, so results do not depend on batching; the Engine
(fastdiff.engine) runs the same jobs for many requests at once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdiff.jobs import Job, edit_guidance, no_guidance, step_jobs, text_guidance
from fastdiff.samplers import make_sampler

# The sampler used when the folder's scheduler class is not implemented here (SD1.5 ships
# PNDMScheduler): diffusers' usual replacement, `DPMSolverMultistepScheduler.from_config(...)`.
FALLBACK_SAMPLER = "dpmpp_2m"


class PipelineError(ValueError):
    """A model folder or argument the pipeline cannot use; the message names it and says what was expected."""


@dataclasses.dataclass
class Defaults:
    """Per-model sampling defaults (the model's scheduler config and its authors' settings)."""

    steps: int = 50  # StableDiffusionPipeline's default
    guidance_scale: float = 7.5  # SD's and InstructPix2Pix/MGIE's text scale
    image_guidance_scale: float = 1.5  # InstructPix2Pix/MGIE's image scale
    sampler: str | None = None  # None: the scheduler config's class
    size: int = 512  # image side in pixels: the UNet's sample_size times the VAE's factor


@dataclasses.dataclass
class _Request:
    """Prepared work of one call: its jobs and how to turn their final latents into outputs."""

    jobs: list[Job]
    finish_fn: object  # (list of final latents) -> list of outputs

    def finish(self):
        return self.finish_fn([job.latents for job in self.jobs])


def _module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module) -> torch.device:
    return next(module.parameters()).device


def _cross_attention_dim(unet) -> int:
    config = unet.config
    return config.cross_dim if hasattr(config, "cross_dim") else config.cross_attention_dim


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (str, numbers.Number)) else type(value).__name__


def load_image(image) -> Image.Image:
    """A PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or float [0, 1] array, or a path -> an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as exc:
            raise PipelineError(f"image: cannot read {os.fspath(image)!r} as an image ({exc})") from None
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise PipelineError(f"image: expected an HxW or HxWxC (C = 1, 3, 4) array, got shape {image.shape}")
        if np.issubdtype(array.dtype, np.floating):
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            raise PipelineError(f"image: expected a uint8 array or a float array in [0, 1], got dtype {array.dtype}")
        image = Image.fromarray(np.ascontiguousarray(array))
    elif not isinstance(image, Image.Image):
        raise PipelineError(f"image: expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, multiple: int) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) in [-1, 1], sides rounded down to `multiple` (as diffusers' VaeImageProcessor)."""
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise PipelineError(f"image: {image.size[0]}x{image.size[1]} is smaller than the model's {multiple}-pixel grid")
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def tensor_to_images(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> PIL images, or a (B, H, W, 3) float array in [0, 1] for output_type='np'."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PipelineError(f"{name}: expected a positive integer, got {_describe(value)}")
    return int(value)


def _number(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PipelineError(f"{name}: expected a finite number, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise PipelineError(f"{name}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _output_type(value):
    if value not in ("pil", "np"):
        raise PipelineError(f"output_type: expected 'pil' or 'np', got {_describe(value)}")
    return value


def _known_sampler(name) -> bool:
    try:
        make_sampler(name)
    except ValueError:
        return False
    return True


class Pipeline:
    """A UNet, a VAE, a text encoder (optional when embeddings are given), a sampler config and,
    for MGIE, the edit head with the [IMG] token embeddings."""

    def __init__(self, *, unet, vae, scheduler_config: dict, text_encoder=None, edit_head=None,
                 img_token_embeddings: torch.Tensor | None = None, defaults: Defaults | None = None, name: str = ""):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.edit_head, self.img_token_embeddings = edit_head, img_token_embeddings
        self.name = name
        self.latent_channels = vae.config.latent_channels
        self.vae_scale = vae.config.downscale
        self.cross_attention_dim = _cross_attention_dim(unet)
        in_channels = unet.config.in_channels
        self.is_editor = in_channels == 2 * self.latent_channels
        if not self.is_editor and in_channels != self.latent_channels:
            raise PipelineError(
                f"unet: in_channels {in_channels} fits neither text-to-image ({self.latent_channels}, the VAE's latent "
                f"channels) nor editing ({2 * self.latent_channels}); inpainting UNets are not supported"
            )
        if text_encoder is not None and text_encoder.hidden_size != self.cross_attention_dim:
            raise PipelineError(f"text_encoder: hidden size {text_encoder.hidden_size} differs from the UNet's "
                                f"cross_attention_dim {self.cross_attention_dim}")
        if edit_head is not None and edit_head.hid2feat.out_features != self.cross_attention_dim:
            raise PipelineError(f"mgie: the edit head's output width {edit_head.hid2feat.out_features} differs from the "
                                f"UNet's cross_attention_dim {self.cross_attention_dim}")
        self.defaults = defaults or Defaults(steps=100 if self.is_editor else 50)
        scheduler_class = self.scheduler_config.get("_class_name")
        if self.defaults.sampler is None and not _known_sampler(scheduler_class):
            warnings.warn(f"scheduler: {scheduler_class} is not implemented by fastdiff; sampling with "
                          f"{FALLBACK_SAMPLER} on its config instead (pass sampler= to choose another)", stacklevel=3)
            self.defaults = dataclasses.replace(self.defaults, sampler=FALLBACK_SAMPLER)
        try:  # fail now on an unusable scheduler config
            make_sampler(self.defaults.sampler, self.scheduler_config)
        except ValueError as exc:
            raise PipelineError(f"scheduler: {exc}") from None

    def __repr__(self):
        kind = "editor" if self.is_editor else "text-to-image"
        return f"Pipeline({self.name or type(self.unet).__name__}, {kind}, {_module_dtype(self.unet)}, {_module_device(self.unet)})"

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, device=None, mgie=None) -> "Pipeline":
        """Load a diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.

        The UNet may be SD-style (UNet2DConditionModel; 8 input channels for InstructPix2Pix) or a
        MobileDiffusion checkpoint (unet/config.json with "_class_name": "MobileDiffusionUNet").
        mgie: a folder with MGIE's unet.pt (replaces the UNet weights) and mllm.pt (the edit head
        and the [IMG] token embeddings). Problems raise PipelineError naming the folder part.
        """
        from fastdiff.loading import load_pipeline_parts

        return cls(**load_pipeline_parts(Path(folder), dtype=dtype, device=device, mgie=mgie))

    # -- conditioning -------------------------------------------------------------------------

    def _encode_text(self, name: str, text) -> torch.Tensor:
        """(1, L, D) fp32 CLIP features of one string; `name` is the argument it came from."""
        if not isinstance(text, str):
            raise PipelineError(f"{name}: expected a string, got {_describe(text)}")
        if self.text_encoder is None:
            raise PipelineError(f"{name}: this pipeline has no text encoder; pass {name}_embeds instead")
        return self.text_encoder.encode([text]).float()

    def _embeds(self, name: str, embeds) -> torch.Tensor:
        """Given conditioning (L, D) or (1, L, D) -> (1, L, D) fp32, D = the UNet's cross-attention width."""
        D = self.cross_attention_dim
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.dim() not in (2, 3) \
                or (embeds.dim() == 3 and embeds.shape[0] != 1) or embeds.shape[-1] != D or embeds.shape[-2] < 1:
            raise PipelineError(f"{name}: expected a float (L, {D}) or (1, L, {D}) tensor (the UNet's "
                                f"cross_attention_dim is {D}), got {_describe(embeds)}")
        return embeds.reshape(1, *embeds.shape[-2:]).float()

    def _context(self, name, text, embeds) -> torch.Tensor:
        """(1, L, D) conditioning from `{name}_embeds` if given, else from the string `name`."""
        return self._embeds(f"{name}_embeds", embeds) if embeds is not None else self._encode_text(name, text)

    def _mgie_context(self, img_hidden_states):
        """MGIE: the edit head maps the MLLM's 8 [IMG] hidden states (+ the [IMG] token embeddings) to
        the UNet's context; its null conditioning is the edit head applied to zeros, as MGIE does."""
        if self.edit_head is None:
            raise PipelineError("img_hidden_states: this pipeline has no MGIE edit head; load it with from_pretrained(..., mgie=DIR)")
        expected = tuple(self.img_token_embeddings.shape)
        hidden = img_hidden_states
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() not in (2, 3) \
                or tuple(hidden.shape[-2:]) != expected or (hidden.dim() == 3 and hidden.shape[0] != 1):
            raise PipelineError(f"img_hidden_states: expected a float {expected} or (1, *{expected}) tensor, got {_describe(hidden)}")
        dtype, device = _module_dtype(self.edit_head), _module_device(self.edit_head)
        hidden = hidden.reshape(1, *expected).to(device, dtype)
        embeddings = self.img_token_embeddings.reshape(1, *expected).to(device, dtype)
        with torch.inference_mode():
            context = self.edit_head(hidden, embeddings).float()
            null = self.edit_head(torch.zeros_like(hidden), embeddings).float()
        return context, null

    # -- request preparation (shared by generate/edit and the Engine) -------------------------

    @staticmethod
    def _seed(seed) -> int:
        if seed is None:
            return int(torch.randint(0, 2**31 - 1, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
            raise PipelineError(f"seed: expected a non-negative integer or None, got {_describe(seed)}")
        return int(seed)

    def _sampler_run(self, sampler, steps):
        if sampler is not None and not isinstance(sampler, str):
            raise PipelineError(f"sampler: expected a sampler name or None, got {_describe(sampler)}")
        try:
            chosen = make_sampler(sampler or self.defaults.sampler, self.scheduler_config)
        except ValueError as exc:
            raise PipelineError(f"sampler: {exc}") from None
        try:
            return chosen.start(steps)
        except ValueError as exc:
            raise PipelineError(f"steps: {exc}") from None

    def _new_job(self, sampler, steps, context, combine, seed, shape, latents=None, image_latents=None) -> Job:
        """One image's job. latents: its initial noise (before init_noise_sigma, as diffusers' `latents=`)."""
        run = self._sampler_run(sampler, steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        device = _module_device(self.unet)
        if latents is None:
            latents = run.initial_latents(shape, generator=generator, device=device)
        else:
            latents = latents.reshape(shape).to(device=device, dtype=torch.float32) * run.init_noise_sigma
        return Job(run=run, latents=latents, context=context.to(device), combine=combine, generator=generator,
                   image_latents=None if image_latents is None else image_latents.to(device))

    @staticmethod
    def _check_latents(latents, shape):
        if latents is not None and (not isinstance(latents, torch.Tensor) or not latents.is_floating_point()
                                    or tuple(latents.shape) not in (tuple(shape), tuple(shape[1:]))):
            raise PipelineError(f"latents: expected a float tensor of shape {tuple(shape)}, got {_describe(latents)}")

    def _decode(self, latents_list, output_type):
        with torch.inference_mode():
            latents = self.vae.unscale_latents(torch.cat(latents_list)).to(_module_dtype(self.vae))
            return tensor_to_images(self.vae.decode(latents), output_type)

    def _prepare_generate(self, prompt=None, *, negative_prompt=None, steps=None, guidance_scale=None, height=None,
                          width=None, seed=None, sampler=None, num_images=1, prompt_embeds=None,
                          negative_prompt_embeds=None, latents=None, output_type="pil") -> _Request:
        if self.is_editor:
            raise PipelineError("generate: this is an editing model (8-channel UNet); use edit()")
        steps = _positive_int("steps", self.defaults.steps if steps is None else steps)
        guidance = _number("guidance_scale", self.defaults.guidance_scale if guidance_scale is None else guidance_scale, 0)
        num_images = _positive_int("num_images", num_images)
        size = self.defaults.size
        height, width = (_positive_int(n, size if v is None else v) for n, v in (("height", height), ("width", width)))
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale:
                raise PipelineError(f"{name}: expected a multiple of {self.vae_scale} (the VAE's factor), got {value}")
        output_type = _output_type(output_type)
        base_seed = self._seed(seed)
        if (prompt is None) == (prompt_embeds is None):
            raise PipelineError("prompt: give exactly one of prompt, prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise PipelineError("negative_prompt: give at most one of negative_prompt, negative_prompt_embeds")
        context = self._context("prompt", prompt, prompt_embeds)
        if guidance > 1:  # diffusers' do_classifier_free_guidance; rows [uncond, text], as diffusers orders them
            negative = self._context("negative_prompt", "" if negative_prompt is None else negative_prompt, negative_prompt_embeds)
            if negative.shape != context.shape:
                raise PipelineError(f"negative_prompt_embeds: expected prompt's shape {tuple(context.shape[1:])}, got {tuple(negative.shape[1:])}")
            context, combine = torch.cat([negative, context]), text_guidance(guidance)
        else:
            combine = no_guidance
        shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is not None and (not isinstance(latents, torch.Tensor) or latents.shape[0] != num_images):
            raise PipelineError(f"latents: expected a float tensor of shape {(num_images, *shape[1:])}, got {_describe(latents)}")
        jobs = []
        for i in range(num_images):
            noise = None if latents is None else latents[i : i + 1]
            self._check_latents(noise, shape)
            jobs.append(self._new_job(sampler, steps, context, combine, base_seed + i, shape, noise))
        return _Request(jobs, lambda final: self._decode(final, output_type))

    def _prepare_edit(self, image, instruction=None, *, steps=None, guidance_scale=None, image_guidance_scale=None,
                      seed=None, sampler=None, instruction_embeds=None, negative_instruction_embeds=None,
                      img_hidden_states=None, latents=None, output_type="pil") -> _Request:
        if not self.is_editor:
            raise PipelineError("edit: this is a text-to-image model; use generate() (editing needs an 8-channel UNet)")
        steps = _positive_int("steps", self.defaults.steps if steps is None else steps)
        text_scale = _number("guidance_scale", self.defaults.guidance_scale if guidance_scale is None else guidance_scale, 0)
        image_scale = _number("image_guidance_scale", self.defaults.image_guidance_scale if image_guidance_scale is None else image_guidance_scale, 0)
        output_type = _output_type(output_type)
        seed = self._seed(seed)
        given = [n for n, v in (("instruction", instruction), ("instruction_embeds", instruction_embeds),
                                ("img_hidden_states", img_hidden_states)) if v is not None]
        if len(given) != 1:
            raise PipelineError(f"instruction: give exactly one of instruction, instruction_embeds, img_hidden_states (got {given or 'none'})")
        guided = text_scale > 1 and image_scale >= 1  # diffusers' do_classifier_free_guidance for InstructPix2Pix
        if img_hidden_states is not None:
            context, null = self._mgie_context(img_hidden_states)
        else:
            context = self._context("instruction", instruction, instruction_embeds)
            null = None
            if guided:  # InstructPix2Pix's unconditional text: the empty prompt
                null = self._context("negative_instruction", "", negative_instruction_embeds)
                if null.shape != context.shape:
                    raise PipelineError(f"negative_instruction_embeds: expected the instruction's shape {tuple(context.shape[1:])}, "
                                        f"got {tuple(null.shape[1:])}")
        pixels = image_to_tensor(load_image(image), self.vae_scale)
        shape = (1, self.latent_channels, pixels.shape[2] // self.vae_scale, pixels.shape[3] // self.vae_scale)
        self._check_latents(latents, shape)
        device, dtype = _module_device(self.vae), _module_dtype(self.vae)
        with torch.inference_mode():
            image_latents = self.vae.encode(pixels.to(device, dtype)).float()  # latent mode, unscaled (as diffusers)
        if guided:  # rows [text, image, uncond]: the image-only and unconditional rows see the null text
            context = torch.cat([context, null, null])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
            combine = edit_guidance(text_scale, image_scale)
        else:
            combine = no_guidance
        job = self._new_job(sampler, steps, context, combine, seed, shape, latents, image_latents)
        return _Request([job], lambda final: self._decode(final, output_type))

    # -- public API ---------------------------------------------------------------------------

    def _run(self, request: _Request, progress: bool):
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(job.run.num_steps for job in request.jobs), desc="denoising", unit="step",
                   disable=not progress, leave=False)
        for job in request.jobs:
            job.on_step = lambda _: bar.update(1)
        try:
            while not all(job.done for job in request.jobs):
                step_jobs(self.unet, [job for job in request.jobs if not job.done])
        finally:
            bar.close()
        return request.finish()

    def generate(self, prompt=None, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                 seed=None, sampler=None, num_images=1, prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 output_type="pil", progress=True):
        """Text to image. Returns a list of `num_images` PIL images (or an (N, H, W, 3) array in [0, 1] for output_type='np').

        steps, guidance_scale, sampler: default to the model's (`pipe.defaults`; SD: 50 steps,
        scale 7.5, the scheduler config's sampler); guidance_scale <= 1 runs without guidance.
        height/width: default the UNet's sample size times the VAE factor (512 for SD1.5).
        seed: image i uses seed + i, each image its own generator. prompt_embeds (L, D) may replace
        prompt; the negative prompt (default "") or negative_prompt_embeds is the unconditional
        branch. latents: (num_images, C, h, w) initial noise, scaled by the sampler's
        init_noise_sigma, as diffusers' `latents=`. sampler: see fastdiff.samplers.SAMPLERS.
        """
        request = self._prepare_generate(
            prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, height=height,
            width=width, seed=seed, sampler=sampler, num_images=num_images, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, latents=latents, output_type=output_type)
        return self._run(request, progress)

    def edit(self, image, instruction=None, *, steps=None, guidance_scale=None, image_guidance_scale=None, seed=None,
             sampler=None, instruction_embeds=None, negative_instruction_embeds=None, img_hidden_states=None,
             latents=None, output_type="pil", progress=True):
        """Edit `image` (PIL image, array or path; converted to RGB, sides rounded down to a multiple of
        the VAE factor, 8 for SD) following an instruction. Returns one PIL image (or an (H, W, 3)
        array in [0, 1] for output_type='np').

        The instruction is text (CLIP-encoded: InstructPix2Pix), or instruction_embeds (77, 768)
        with the unconditional negative_instruction_embeds (default: the empty prompt's), or
        img_hidden_states (8, 4096): an MLLM's [IMG] states mapped by MGIE's edit head (whose null
        conditioning is the head applied to zeros). Guidance is InstructPix2Pix's 3-way:
        uncond + g (text - image) + g_img (image - uncond), on when g > 1 and g_img >= 1; defaults
        g = 7.5, g_img = 1.5 and the model's steps and sampler. latents: (1, C, h, w) initial noise
        as diffusers' `latents=`.
        """
        request = self._prepare_edit(
            image, instruction, steps=steps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
            seed=seed, sampler=sampler, instruction_embeds=instruction_embeds,
            negative_instruction_embeds=negative_instruction_embeds, img_hidden_states=img_hidden_states,
            latents=latents, output_type=output_type)
        return self._run(request, progress)[0]
