"""Pipelines: text-to-image `generate` and instruction-based `edit` (InstructPix2Pix / MGIE).

    pipe = fastdiff.Pipeline.from_pretrained("path/to/diffusers-folder", dtype="bf16")
    image = pipe.generate("a red bicycle", steps=25, seed=0)[0]
    edited = pipe.edit("in.png", "make it snowy", steps=20, seed=0)

Both follow diffusers' StableDiffusionPipeline / StableDiffusionInstructPix2PixPipeline step for
step (same guidance order, latent scaling and image-latent concatenation), on fastdiff's models;
an SDXL folder generates as StableDiffusionXLPipeline does (two text encoders, pooled embedding,
size/crop ids);
tests/test_pipeline.py checks the images against diffusers'. Every call is a request value
(fastdiff.requests) that `resolve` checks against the model once, into a Resolved (defaults
filled, sampler built, guidance chosen, image loaded), and `prepare` turns into Jobs
(fastdiff.jobs), each image with its own generator, so results do not depend on batching; the
Engine (fastdiff.engine) prepares the same Resolved values and runs their jobs together.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path

import torch

from fastdiff import loading
from fastdiff.images import image_to_tensor, load_image, tensor_to_images
from fastdiff.jobs import Job, StepCache, step_jobs
from fastdiff.quantization import check_quantize
from fastdiff.quantization import quantize as quantize_model
from fastdiff.requests import (DEFAULT_MAX_PIXELS, Defaults, EditRequest, GenerateRequest, Guidance, PipelineError, Request,
                               build_request, choose_guidance, describe, max_pixels_limit, resolve_dtype)
from fastdiff.samplers import Sampler, make_sampler

# SDXL's size/crop ids (micro-conditioning): original (height, width), crop (top, left), target (height, width)
SDXL_TIME_IDS = 6

# The sampler used when the folder's scheduler class is not implemented here (SD1.5 ships
# PNDMScheduler): diffusers' usual replacement, `DPMSolverMultistepScheduler.from_config(...)`.
FALLBACK_SAMPLER = "dpmpp_2m"


@dataclasses.dataclass(frozen=True, eq=False)
class Resolved:
    """A request resolved against one pipeline (Pipeline.resolve), once: what every later stage
    (prepare, the Engine, MGIE, the server) takes, so none of them fills defaults or checks again.

    request: every default filled in (steps, scales, sampler name, size), an edit's image loaded.
    sampler: built from the pipeline's scheduler config. guidance: the row layout and combine the
    scales ask for. latent_shape: one image's (1, C, h, w). pixels: what the pixel limit was
    checked on (all output images; an edit's input image per image)."""

    request: Request
    pipe: "Pipeline"
    sampler: Sampler
    guidance: Guidance
    latent_shape: tuple[int, int, int, int]
    pixels: int

    def with_img_hidden_states(self, states: torch.Tensor) -> "Resolved":
        """This edit conditioned by MGIE's [IMG] states instead of the placeholder it was resolved
        with (the MLLM runs after the request is checked); same shape, nothing else changes."""
        expected = tuple(self.request.img_hidden_states.shape)
        if tuple(states.shape) != expected:
            raise PipelineError("img_hidden_states", f"expected {expected} like the resolved request, got {describe(states)}")
        return dataclasses.replace(self, request=dataclasses.replace(self.request, img_hidden_states=states))


@dataclasses.dataclass(eq=False)
class Prepared:
    """A request made ready to denoise: its jobs (one per image) and how to decode their results."""

    resolved: Resolved
    jobs: list[Job]

    @property
    def request(self) -> Request:
        return self.resolved.request

    @property
    def pipe(self) -> "Pipeline":
        return self.resolved.pipe

    def finish(self):
        """The outputs from the jobs' final latents, per request.output_type: a list of PIL images, an
        (N, H, W, 3) array, an (N, 3, H, W) tensor, or the (N, C, h, w) latents themselves."""
        return self.pipe.decode([job.latents for job in self.jobs], self.request.output_type)

    def step_end(self) -> None:
        """diffusers' callback_on_step_end, after the step all of this request's jobs just took
        (they step together: one sampler, one step count)."""
        callback = self.request.callback_on_step_end
        if callback is None:
            return
        run = self.jobs[0].run
        index = run.next_index - 1
        latents = torch.cat([job.latents for job in self.jobs])
        result = callback(self.pipe, index, run.timesteps[index], {"latents": latents})
        replaced = result.get("latents") if isinstance(result, dict) else None
        if replaced is not None:
            if not isinstance(replaced, torch.Tensor) or replaced.shape != latents.shape:
                raise PipelineError("callback_on_step_end", f"returned latents of {describe(replaced)}, expected the "
                                    f"shape {tuple(latents.shape)} it was given")
            for job, row in zip(self.jobs, replaced.split(1)):
                job.latents = row.to(job.latents)


def _known_sampler(name) -> bool:
    try:
        make_sampler(name)
    except ValueError:
        return False
    return True


def _takes_request(request_class, positional: tuple[str, ...]):
    """Give a method taking (*positional, **options) the signature of `request_class`'s fields, so
    help() and editors show the keyword list that the dataclass alone defines."""
    def decorate(method):
        fields = [f for f in dataclasses.fields(request_class)]
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
                   for f in fields if f.name in positional]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                   for f in fields if f.name not in positional]
        params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True))
        method.__signature__ = inspect.Signature(params)
        return method

    return decorate


class Pipeline:
    """A UNet, a VAE, a text encoder (optional when embeddings are given), a sampler config and,
    for MGIE, the edit head with the [IMG] token embeddings.

    SDXL (a UNet with addition_embed_type "text_time"): text-to-image, the text encoder an
    SDXLTextEncoders (both of SDXL's; its pooled embedding and the size/crop ids are the UNet's
    added conditioning). force_zeros_for_empty_prompt: SDXL's unconditional branch is zeros when no
    negative prompt is given (diffusers' pipeline config, default true); SD pipelines encode "".

    max_pixels: requests for more output pixels than this (all images of a request together; an
    edit's input image alone) are refused before any allocation.
    """

    def __init__(self, *, unet, vae, scheduler_config: dict, text_encoder=None, edit_head=None,
                 img_token_embeddings: torch.Tensor | None = None, defaults: Defaults | None = None, name: str = "",
                 max_pixels: int = DEFAULT_MAX_PIXELS, force_zeros_for_empty_prompt: bool = True):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.edit_head, self.img_token_embeddings = edit_head, img_token_embeddings
        self.name = name
        self.quantized = None  # "int8" once quantize() ran
        self.max_pixels = max_pixels_limit(max_pixels)
        self.latent_channels = vae.config.latent_channels
        self.vae_scale = vae.config.downscale
        self.cross_attention_dim = unet.cross_attention_dim
        in_channels = unet.in_channels
        self.is_editor = loading.is_editor(unet, vae)
        if not self.is_editor and in_channels != self.latent_channels:
            raise PipelineError(
                "unet", f"in_channels {in_channels} fits neither text-to-image ({self.latent_channels}, the VAE's latent "
                f"channels) nor editing ({2 * self.latent_channels}); inpainting UNets are not supported"
            )
        self.is_sdxl = loading.is_sdxl(unet)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.pooled_size = self._check_sdxl(text_encoder) if self.is_sdxl else None
        if not self.is_sdxl and hasattr(text_encoder, "pooled_size"):
            raise PipelineError("text_encoder", "SDXL's two text encoders, for a UNet without SDXL's added "
                                "conditioning (addition_embed_type 'text_time')")
        if text_encoder is not None and text_encoder.hidden_size != self.cross_attention_dim:
            raise PipelineError("text_encoder", f"hidden size {text_encoder.hidden_size} differs from the UNet's "
                                f"cross_attention_dim {self.cross_attention_dim}")
        if edit_head is not None and edit_head.hid2feat.out_features != self.cross_attention_dim:
            raise PipelineError("mgie", f"the edit head's output width {edit_head.hid2feat.out_features} differs from the "
                                f"UNet's cross_attention_dim {self.cross_attention_dim}")
        self.defaults = defaults or Defaults.for_model(editor=self.is_editor, sdxl=self.is_sdxl)
        scheduler_class = self.scheduler_config.get("_class_name")
        if self.defaults.sampler is None and not _known_sampler(scheduler_class):
            warnings.warn(f"scheduler: {scheduler_class} is not implemented by fastdiff; sampling with "
                          f"{FALLBACK_SAMPLER} on its config instead (pass sampler= to choose another)", stacklevel=3)
            self.defaults = dataclasses.replace(self.defaults, sampler=FALLBACK_SAMPLER)
        self._sampler(None)  # fail now on an unusable scheduler config

    def _check_sdxl(self, text_encoder) -> int:
        """An SDXL pipeline's parts fit: text-to-image, a text encoder with SDXL's pooled embedding,
        whose width and the 6 size/crop ids make the UNet's added-embedding input. Returns the
        pooled width."""
        if self.is_editor:
            raise PipelineError("unet", f"an SDXL editing UNet ({self.unet.in_channels} input channels: "
                                f"InstructPix2Pix-style) is not run by Pipeline, which runs SDXL text-to-image; use "
                                f"diffusers' StableDiffusionXLInstructPix2PixPipeline with fastdiff.accelerate(pipe)")
        config = self.unet.config
        time_ids = SDXL_TIME_IDS * config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - time_ids
        if text_encoder is not None and getattr(text_encoder, "pooled_size", None) is None:
            raise PipelineError("text_encoder", f"an SDXL UNet needs both SDXL text encoders (SDXLTextEncoders: the "
                                f"pooled embedding is text_encoder_2's), got {type(text_encoder).__name__}")
        if text_encoder is not None and text_encoder.pooled_size != pooled:
            raise PipelineError("text_encoder", f"pooled width {text_encoder.pooled_size} + {SDXL_TIME_IDS} size/crop "
                                f"ids x {config.addition_time_embed_dim} differs from the UNet's "
                                f"projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim}"
                                f" (an SDXL refiner's ids include an aesthetic score: not run by Pipeline)")
        return pooled

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def __repr__(self):
        kind = "editor" if self.is_editor else "text-to-image"
        quantized = f", {self.quantized} weights" if self.quantized else ""
        return f"Pipeline({self.name or type(self.unet).__name__}, {kind}, {self.dtype}{quantized}, {self.device})"

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, device=None, mgie=None, vae=None,
                        max_pixels=DEFAULT_MAX_PIXELS, quantize=None) -> "Pipeline":
        """Load a diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.

        dtype: None (float32), a torch.dtype or "fp32"/"float32"/"bf16"/"bfloat16" ("fp16"/"float16"
        on CUDA); a dtype the device cannot run is refused here. The UNet may be SD-style
        (UNet2DConditionModel; 8 input channels for InstructPix2Pix), SDXL's (text-to-image, with
        text_encoder_2/ and tokenizer_2/) or a MobileDiffusion checkpoint
        (unet/config.json with "_class_name": "MobileDiffusionUNet"). mgie: a folder with MGIE's
        unet.pt (replaces the UNet weights) and mllm.pt (the edit head and the [IMG] token
        embeddings). vae: None (the folder's vae/, an AutoencoderKL or an AutoencoderTiny), "tiny"
        (vae/ must be an AutoencoderTiny; nothing is downloaded, so otherwise PipelineError) or a
        diffusers VAE folder used instead of vae/, e.g. a TAESD (AutoencoderTiny) folder: its latents
        are already in the UNet's space (scaling_factor 1.0), so text-to-image only. Problems raise
        PipelineError naming the folder part. quantize: None, or "int8" to run the UNet's linear and
        1x1 convolution weights in int8 (Pipeline.quantize).
        """
        check_quantize(quantize)
        dtype = resolve_dtype(dtype, device)
        parts = loading.load_pipeline_parts(Path(folder), dtype=dtype, device=device, mgie=mgie, vae=vae)
        pipe = cls(**parts, max_pixels=max_pixels)
        if quantize:
            pipe.quantize(quantize)
        return pipe

    def quantize(self, dtype: str = "int8") -> list[str]:
        """The UNet's nn.Linear and 1x1 convolution weights to int8 (W8A8, fastdiff.quantize's
        defaults: conv_in/conv_out, the time and added embeddings, the 3x3 and separable convolutions
        stay in float), in place; the text encoder, the VAE and an edit head stay float (they run
        once per image). Returns the quantized modules' names."""
        names = quantize_model(self.unet, dtype)
        self.quantized = dtype
        return names

    # -- checking a request against this model ------------------------------------------------

    def _sampler(self, name):
        try:
            return make_sampler(name or self.defaults.sampler, self.scheduler_config)
        except ValueError as exc:
            raise PipelineError("sampler" if name else "scheduler", str(exc)) from None

    def _checked_sampler(self, sampler_name, steps) -> Sampler:
        """The sampler, built once per request; its step range checked now."""
        sampler = self._sampler(sampler_name)
        try:
            sampler.start(steps)
        except ValueError as exc:
            raise PipelineError("steps", str(exc)) from None
        return sampler

    def _check_embeds(self, name, embeds, like=None) -> None:
        D = self.cross_attention_dim
        if embeds.shape[-1] != D:
            raise PipelineError(name, f"expected a float (L, {D}) or (1, L, {D}) tensor (the UNet's "
                                f"cross_attention_dim is {D}), got {describe(embeds)}")
        if like is not None and embeds.shape[-2:] != like.shape[-2:]:
            raise PipelineError(name, f"expected the shape {tuple(like.shape[-2:])} of its conditional twin, "
                                f"got {tuple(embeds.shape[-2:])}")

    def _resolve_sdxl(self, request: GenerateRequest, height: int, width: int) -> dict:
        """SDXL's fields of a generate request checked (pooled embeddings with given embeddings, their
        width) and its size/crop ids filled in (diffusers' defaults: the output size, crop (0, 0));
        on other models, refused when given."""
        sdxl_fields = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "original_size",
                       "crops_coords_top_left", "target_size")
        if not self.is_sdxl:
            for name in sdxl_fields:
                if getattr(request, name) is not None:
                    raise PipelineError(name, "this model has no SDXL added conditioning (a UNet with "
                                        "addition_embed_type 'text_time'): pass None")
            return {}
        for embeds, pooled in (("prompt_embeds", "pooled_prompt_embeds"),
                               ("negative_prompt_embeds", "negative_pooled_prompt_embeds")):
            if getattr(request, embeds) is not None and getattr(request, pooled) is None:
                raise PipelineError(pooled, f"SDXL needs it with {embeds}: text_encoder_2's projected text "
                                    f"embedding, ({self.pooled_size},)")
            value = getattr(request, pooled)
            if value is not None and value.shape[-1] != self.pooled_size:
                raise PipelineError(pooled, f"expected a float ({self.pooled_size},) or (1, {self.pooled_size}) tensor "
                                    f"(the UNet's pooled width), got {describe(value)}")
        return dict(original_size=request.original_size or (height, width), target_size=request.target_size or (height, width),
                    crops_coords_top_left=request.crops_coords_top_left or (0, 0))

    def _zero_negative(self, request: GenerateRequest) -> bool:
        """SDXL's unconditional branch is zeros, not an encoded prompt (diffusers' force_zeros_for_empty_prompt
        when neither negative_prompt nor negative_prompt_embeds is given)."""
        return (self.is_sdxl and self.force_zeros_for_empty_prompt and request.negative_prompt is None
                and request.negative_prompt_embeds is None)

    def _check_text(self, name, text, embeds, needed=True) -> None:
        """Text conditioning needs the text encoder; say which embeddings to pass instead."""
        if needed and embeds is None and self.text_encoder is None:
            raise PipelineError(name, f"this pipeline has no text encoder; pass {name}_embeds instead")

    def _check_latents(self, latents, shape) -> None:
        if latents is not None and tuple(latents.shape[-3:]) != tuple(shape[-3:]):
            raise PipelineError("latents", f"expected a float tensor of shape {tuple(shape)}, got {describe(latents)}")

    def resolve(self, request: Request, *, max_pixels: int | None = None) -> Resolved:
        """`request` resolved against this model, once (see Resolved): its defaults filled in, checked
        against the model (kind, sizes, embedding widths, the sampler's step range, the pixel limit),
        for an edit its image loaded: every error a request can raise before the models run.
        Cheap: no model runs. max_pixels: a limit for this request (default: the pipeline's)."""
        if not isinstance(request, (GenerateRequest, EditRequest)):
            raise TypeError(f"request: expected a GenerateRequest or EditRequest, got {type(request).__name__}")
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        d = self.defaults
        sampler_name = request.sampler or d.sampler
        steps = request.steps or d.steps
        sampler = self._checked_sampler(sampler_name, steps)
        guidance_scale = d.guidance_scale if request.guidance_scale is None else request.guidance_scale
        cache = dict(cache_interval=request.cache_interval or d.cache_interval, cache_depth=request.cache_depth or d.cache_depth)
        if cache["cache_interval"] > 1 or request.cache_depth is not None:
            levels = self.unet.max_cache_depth
            if not 1 <= cache["cache_depth"] <= levels:
                raise PipelineError("cache_depth", f"expected 1..{levels} (the outer resolution levels of this UNet that "
                                    f"can run on a cached step), got {cache['cache_depth']}" if levels else
                                    f"{type(self.unet).__name__} has no deep part to cache (DeepCache)")
        if isinstance(request, GenerateRequest):
            if self.is_editor:
                raise PipelineError("generate", f"this is an editing model ({self.unet.in_channels}-channel UNet: noisy and "
                                    f"image latents); use edit()")
            height, width = request.height or d.size, request.width or d.size
            for name, value in (("height", height), ("width", width)):
                if value % self.vae_scale:
                    raise PipelineError(name, f"expected a multiple of {self.vae_scale} (the VAE's factor), got {value}")
            pixels = height * width * request.total_images
            if pixels > max_pixels:
                raise PipelineError("height, width", f"{request.total_images} x {width}x{height} ({pixels:,} pixels), over "
                                    f"the limit of {max_pixels:,} (max_pixels)")
            for name, like in (("prompt_embeds", None), ("negative_prompt_embeds", request.prompt_embeds)):
                if getattr(request, name) is not None:
                    self._check_embeds(name, getattr(request, name), like)
            filled = dataclasses.replace(request, steps=steps, guidance_scale=guidance_scale, sampler=sampler_name,
                                         height=height, width=width, **cache, **self._resolve_sdxl(request, height, width))
            guidance = choose_guidance(filled)
            self._check_text("prompt", request.prompt, request.prompt_embeds)
            self._check_text("negative_prompt", request.negative_prompt, request.negative_prompt_embeds,
                             needed=guidance.needs_null and not self._zero_negative(request))
        else:
            if not self.is_editor:
                raise PipelineError("edit", "this is a text-to-image model; use generate() (editing needs a UNet of "
                                    f"{2 * self.latent_channels} input channels: noisy and image latents)")
            image = load_image(request.image, max_pixels=max_pixels // request.num_images)
            pixels = image.width * image.height * request.num_images
            image_scale = d.image_guidance_scale if request.image_guidance_scale is None else request.image_guidance_scale
            for name, like in (("instruction_embeds", None), ("negative_instruction_embeds", request.instruction_embeds)):
                if getattr(request, name) is not None:
                    self._check_embeds(name, getattr(request, name), like)
            filled = dataclasses.replace(request, image=image, steps=steps, guidance_scale=guidance_scale,
                                         image_guidance_scale=image_scale, sampler=sampler_name, **cache)
            guidance = choose_guidance(filled)
            if request.img_hidden_states is None:
                self._check_text("instruction", request.instruction, request.instruction_embeds)
                self._check_text("negative_instruction", "", request.negative_instruction_embeds,
                                 needed=guidance.needs_null)
            else:
                if self.edit_head is None:
                    raise PipelineError("img_hidden_states", "this pipeline has no MGIE edit head; load it with "
                                        "from_pretrained(..., mgie=DIR)")
                expected = tuple(self.img_token_embeddings.shape)
                if tuple(request.img_hidden_states.shape[-2:]) != expected:
                    raise PipelineError("img_hidden_states", f"expected a float {expected} or (1, *{expected}) tensor, "
                                        f"got {describe(request.img_hidden_states)}")
            width, height = (side - side % self.vae_scale for side in image.size)
        shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        self._check_latents(request.latents, (request.total_images, *shape[1:]))
        return Resolved(filled, self, sampler, guidance, shape, pixels)

    # -- conditioning -------------------------------------------------------------------------

    def _context(self, text, embeds) -> torch.Tensor:
        """(1, L, D) fp32 conditioning: the given embeddings, else the CLIP features of `text`."""
        if embeds is not None:
            return embeds.reshape(1, *embeds.shape[-2:]).float()
        return self.text_encoder.encode([text]).float()

    def _conditioning(self, text, embeds, pooled=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, L, D) fp32 conditioning and, for SDXL, the (1, P) pooled embedding (else None): the
        given ones (resolve checked that SDXL's come with their pooled one), else the text encoder's."""
        if embeds is not None or not self.is_sdxl:
            return self._context(text, embeds), None if pooled is None else pooled.reshape(1, -1).float()
        context, pooled = self.text_encoder.encode([text])
        return context.float(), pooled.float()

    def _sdxl_added_cond(self, request: GenerateRequest, guidance: Guidance, pooled, negative_pooled) -> dict:
        """The UNet's text_embeds and time_ids rows of one SDXL image, in the guidance's row order:
        diffusers' add_text_embeds and add_time_ids (original size, crop top-left, target size;
        the same ids on every row, as diffusers without negative_original_size)."""
        ids = torch.tensor([[*request.original_size, *request.crops_coords_top_left, *request.target_size]],
                           dtype=torch.float32)
        return dict(text_embeds=guidance.context(pooled, negative_pooled).to(self.device),
                    time_ids=ids.expand(guidance.branches, -1).to(self.device))

    def _mgie_context(self, img_hidden_states):
        """MGIE: the edit head maps the MLLM's 8 [IMG] hidden states (+ the [IMG] token embeddings) to
        the UNet's context; its null conditioning is the edit head applied to zeros, as MGIE does."""
        head = next(self.edit_head.parameters())
        shape = (1, *self.img_token_embeddings.shape)
        hidden = img_hidden_states.reshape(shape).to(head.device, head.dtype)
        embeddings = self.img_token_embeddings.reshape(shape).to(head.device, head.dtype)
        with torch.inference_mode():
            context = self.edit_head(hidden, embeddings).float()
            null = self.edit_head(torch.zeros_like(hidden), embeddings).float()
        return context, null

    # -- request preparation (shared by generate/edit and the Engine) -------------------------

    def _new_job(self, resolved: Resolved, index, context, image_latents=None, added_cond=None) -> Job:
        """Image `index` of a request: its generator (its own seeded one, its entry of a list, or the
        one shared generator), its initial noise (given latents before init_noise_sigma, as
        diffusers' `latents=`, or drawn), its conditioning rows."""
        request = resolved.request
        run = resolved.sampler.start(request.steps)
        if request.generator is None:
            generator = torch.Generator("cpu").manual_seed(request.seed + index)
        else:
            generator = request.generator[index] if isinstance(request.generator, list) else request.generator
        if request.latents is None:
            latents = run.initial_latents(resolved.latent_shape, generator=generator, device=self.device)
        else:
            latents = request.latents[index : index + 1].to(device=self.device, dtype=torch.float32) * run.init_noise_sigma
        cache = StepCache(request.cache_interval, request.cache_depth) if request.cache_interval > 1 else None
        return Job(run=run, latents=latents, context=context.to(self.device), guidance=resolved.guidance,
                   generator=generator, image_latents=None if image_latents is None else image_latents.to(self.device),
                   cache=cache, added_cond=added_cond)

    def _prepare_generate(self, resolved: Resolved) -> list[Job]:
        request, guidance = resolved.request, resolved.guidance
        jobs = []
        for p, prompt in enumerate(request.prompts):  # images in diffusers' order: prompt by prompt
            context, pooled = self._conditioning(prompt, request.prompt_embeds, request.pooled_prompt_embeds)
            negative = negative_pooled = None
            if guidance.needs_null and self._zero_negative(request):
                negative, negative_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            elif guidance.needs_null:
                negative, negative_pooled = self._conditioning(request.negative_for(p), request.negative_prompt_embeds,
                                                               request.negative_pooled_prompt_embeds)
            if negative is not None and negative.shape != context.shape:
                name = "negative_prompt" if request.negative_prompt_embeds is None else "negative_prompt_embeds"
                raise PipelineError(name, f"its conditioning {tuple(negative.shape[1:])} differs in shape "
                                    f"from the prompt's {tuple(context.shape[1:])}")
            rows = guidance.context(context, negative)
            added = None if pooled is None else self._sdxl_added_cond(request, guidance, pooled, negative_pooled)
            jobs += [self._new_job(resolved, p * request.num_images + n, rows, added_cond=added)
                     for n in range(request.num_images)]
        return jobs

    def _prepare_edit(self, resolved: Resolved) -> list[Job]:
        request, guidance = resolved.request, resolved.guidance
        if request.img_hidden_states is not None:
            context, null = self._mgie_context(request.img_hidden_states)
        else:
            context = self._context(request.instruction, request.instruction_embeds)
            # InstructPix2Pix's unconditional text: the empty prompt
            null = (self._context(request.negative_prompt or "", request.negative_instruction_embeds)
                    if guidance.needs_null else None)
            if null is not None and null.shape != context.shape:
                raise PipelineError("negative_instruction_embeds", f"its shape {tuple(null.shape[1:])} differs from the "
                                    f"instruction's conditioning {tuple(context.shape[1:])}")
        pixels = image_to_tensor(request.image, self.vae_scale)
        with torch.inference_mode():
            image_latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).float()  # latent mode, unscaled (as diffusers)
        rows, image_rows = guidance.context(context, null), guidance.image_latents(image_latents)
        return [self._new_job(resolved, n, rows, image_rows) for n in range(request.num_images)]

    def prepare(self, resolved: Resolved) -> Prepared:
        """Encode a resolved request's conditioning and source image, and set up one job per image;
        the denoising is left to the caller (run, the Engine, MGIE)."""
        if not isinstance(resolved, Resolved) or resolved.pipe is not self:
            raise TypeError(f"resolved: expected what this pipeline's resolve(request) returned, got "
                            f"{type(resolved).__name__}" + (" from another pipeline" if isinstance(resolved, Resolved) else ""))
        request = resolved.request
        jobs = self._prepare_generate(resolved) if isinstance(request, GenerateRequest) else self._prepare_edit(resolved)
        return Prepared(resolved, jobs)

    def decode(self, latents_list: list[torch.Tensor], output_type: str):
        """Final latents (each (1, C, h, w)) -> outputs of `output_type` (see Prepared.finish)."""
        if output_type == "latent":
            return torch.cat(latents_list)
        with torch.inference_mode():
            latents = self.vae.unscale_latents(torch.cat(latents_list)).to(self.vae.dtype)
            return tensor_to_images(self.vae.decode(latents), output_type)

    # -- public API ---------------------------------------------------------------------------

    def run(self, request: Request, *, progress: bool = True):
        """Prepare and denoise one request; returns its outputs, one per image (see Prepared.finish)."""
        from tqdm.auto import tqdm

        prepared = self.prepare(self.resolve(request))
        bar = tqdm(total=sum(job.run.num_steps for job in prepared.jobs), desc="denoising", unit="step",
                   disable=not progress, leave=False)
        for job in prepared.jobs:
            job.on_step = lambda _: bar.update(1)
        try:
            while not all(job.done for job in prepared.jobs):
                step_jobs(self.unet, [job for job in prepared.jobs if not job.done])
                prepared.step_end()
        finally:
            bar.close()
        return prepared.finish()

    @_takes_request(GenerateRequest, positional=("prompt",))
    def generate(self, prompt=None, *, progress=True, **options):
        """Text to image; the options are GenerateRequest's fields (see it and _Sampling for each
        default and where it comes from), also under diffusers' names num_inference_steps and
        num_images_per_prompt. Returns num_images images per prompt: a list of PIL images, or
        per output_type an (N, H, W, 3) array ("np"), an (N, 3, H, W) tensor ("pt") in [0, 1], or
        the final latents ("latent").
        """
        return self.run(build_request(GenerateRequest, prompt=prompt, **options), progress=progress)

    @_takes_request(EditRequest, positional=("image", "instruction"))
    def edit(self, image, instruction=None, *, progress=True, **options):
        """Edit `image` following an instruction; the options are EditRequest's fields (also
        prompt= for the instruction and diffusers' num_inference_steps / num_images_per_prompt).
        Returns one output (a PIL image, an (H, W, 3) array, a (3, H, W) tensor or (C, h, w)
        latents, per output_type), or, with num_images > 1, all of them as generate does.
        """
        request = build_request(EditRequest, image=image, instruction=instruction, **options)
        outputs = self.run(request, progress=progress)
        return outputs[0] if request.num_images == 1 else outputs
