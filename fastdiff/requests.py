"""Requests as values: what one `generate` or `edit` call asks for, checked once when built.

    request = GenerateRequest(prompt="a red bicycle", steps=25, seed=0)
    images = pipe.run(request)                       # == pipe.generate("a red bicycle", steps=25, seed=0)
    future = engine.submit(EditRequest(image="in.png", instruction="make it snowy"))

Every entry point (Pipeline.generate/edit, Engine.submit_*, fastdiff.generate/edit, the CLI)
builds one of these dataclasses, so a bad argument fails at the door with one line naming it,
before any model work. What depends on the model (its defaults, its VAE factor, its pixel limit,
the sampler's step range) is checked by `Pipeline.resolve(request)`, still before any
allocation. This module is a leaf: it imports nothing from fastdiff but the leaf fastdiff.hardware.

The guidance objects own the row layout of the UNet batch and the combine over those rows, so
the order (diffusers': [uncond, text] for text CFG, [text, image, uncond] for InstructPix2Pix)
is written once, here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from typing import Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from fastdiff import hardware

# Requests larger than this many output pixels are refused before any allocation (4 megapixels:
# 2048x2048; SD1.5's native size is 512x512). Pipelines and engines take max_pixels= to change it.
DEFAULT_MAX_PIXELS = 4 * 1024 * 1024

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class PipelineError(ValueError):
    """A model folder or argument the pipeline cannot use: `field` names it (the argument, or the
    folder part), `detail` says what was wrong and what was expected; str() is "field: detail"."""

    def __init__(self, field: str, detail: str):
        super().__init__(field, detail)  # both in args: the error pickles (Ray) and compares by value
        self.field, self.detail = field, detail

    def __str__(self):
        return f"{self.field}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Per-model sampling defaults (the model's scheduler config and its authors' settings)."""

    steps: int = 50  # StableDiffusionPipeline's default
    guidance_scale: float = 7.5  # SD's and InstructPix2Pix/MGIE's text scale
    image_guidance_scale: float = 1.5  # InstructPix2Pix/MGIE's image scale
    sampler: str | None = None  # None: the scheduler config's class
    size: int = 512  # image side in pixels: the UNet's sample_size times the VAE's factor
    cache_interval: int = 1  # DeepCache: every step full (caching off)
    cache_depth: int = 1  # DeepCache: the outermost level runs on cached steps (the paper's shallowest branch)

    @classmethod
    def for_model(cls, *, editor: bool, sdxl: bool = False, **settings) -> "Defaults":
        """A model's defaults: StableDiffusionPipeline's 50 steps, or InstructPix2Pix's and MGIE's 100
        for an editor; StableDiffusionXLPipeline's text scale 5 for SDXL; `settings` (the folder's
        stored defaults, its size) override."""
        return cls(**{"steps": 100 if editor else 50, **({"guidance_scale": 5.0} if sdxl else {}), **settings})


# -- dtype: settled once, where a model is loaded -------------------------------------------------

def resolve_dtype(dtype, device=None, *, name: str = "dtype") -> torch.dtype:
    """None (float32), a torch.dtype or one of "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"
    -> the torch.dtype, refused with PipelineError when `device` (default CPU) cannot run it."""
    if dtype is None:
        resolved = torch.float32
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in hardware.DTYPE_NAMES:
        resolved = hardware.DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    else:
        raise PipelineError(name, f"expected a torch.dtype or one of {sorted(hardware.DTYPE_NAMES)}, got {describe(dtype)}")
    device_type = resolve_device(device).type
    runnable = hardware.device_dtypes(device_type)
    if resolved not in runnable:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in runnable)
        raise PipelineError(name, f"{str(resolved).removeprefix('torch.')} does not run on {device_type} "
                            f"(fastdiff runs {allowed} there)")
    if resolved not in hardware.fast_dtypes(device_type):
        _warn_slow_dtype(name, resolved, device_type)
    return resolved


def resolve_device(device, *, name: str = "device") -> torch.device:
    """None (the CPU), a torch.device or its name ("cpu", "cuda", "cuda:1") -> the torch.device;
    PipelineError for a name torch does not know and for "meta", where weights cannot live."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise PipelineError(name, f"expected a torch.device or a name such as 'cpu' or 'cuda', got {describe(device)}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PipelineError(name, f"expected a device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if resolved.type == "meta":
        raise PipelineError(name, "'meta' tensors hold no data, so no weights can be loaded there; expected 'cpu' or 'cuda'")
    return resolved


class SlowDtypeWarning(RuntimeWarning):
    """A dtype was asked for that this device runs, but without a fast path (bf16 on a CPU without
    BF16 dot products)."""


_warned_slow: set[tuple[torch.dtype, str]] = set()


def reset_warnings():
    """Forget which slow dtypes were warned about: each warns again, once, at its next use."""
    _warned_slow.clear()


def _warn_slow_dtype(name: str, dtype: torch.dtype, device_type: str):
    """Once per process, dtype and device: the slowdown and the faster choice."""
    if (dtype, device_type) in _warned_slow:
        return
    _warned_slow.add((dtype, device_type))
    fast = ", ".join(str(d).removeprefix("torch.") for d in hardware.fast_dtypes(device_type))
    warnings.warn(f"{name}: {str(dtype).removeprefix('torch.')} has no fast path on this {device_type} "
                  f"({hardware.cpu_name()}: no BF16 dot products, {'/'.join(hardware.BF16_DOT_FLAGS)}), so every product "
                  f"converts to fp32 and back: a UNet step measured {hardware.BF16_SLOWDOWN} slower than fp32 on such a "
                  f"CPU. For speed use dtype='fp32' (the default; fast here: {fast}); bf16 only saves memory here.",
                  SlowDtypeWarning, stacklevel=3)


# -- guidance: row layout and combine in one place ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a request's UNet batch: which conditioning it sees."""

    name: str
    text: bool  # the prompt/instruction (else the null conditioning)
    image: bool = True  # the source image's latents (editing; else zeros)


class Guidance:
    """How one image's guidance branches are laid out as UNet rows and combined back."""

    ROWS: ClassVar[tuple[Row, ...]]

    @property
    def branches(self) -> int:
        return len(self.ROWS)

    @property
    def needs_null(self) -> bool:
        """Some row sees the null conditioning (the negative prompt / unconditional text)."""
        return any(not row.text for row in self.ROWS)

    def context(self, text: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        """(1, L, D) conditioning and null conditioning -> (branches, L, D) in row order (any (1, ...)
        pair alike: SDXL's pooled embeddings)."""
        return torch.cat([text if row.text else null for row in self.ROWS])

    def image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) source-image latents -> (branches, C, h, w); rows that do not see the image get zeros."""
        return torch.cat([latents if row.image else torch.zeros_like(latents) for row in self.ROWS])

    def rows(self, prediction: torch.Tensor) -> dict[str, torch.Tensor]:
        """(branches, C, h, w) UNet output -> each row's (1, C, h, w) prediction by name."""
        return {row.name: part for row, part in zip(self.ROWS, prediction.chunk(self.branches))}

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        """(branches, C, h, w) UNet output -> (1, C, h, w) guided prediction."""
        raise NotImplementedError


class NoGuidance(Guidance):
    ROWS = (Row("text", text=True),)

    def combine(self, prediction):
        return prediction


@dataclasses.dataclass(frozen=True)
class TextGuidance(Guidance):
    """Classifier-free guidance, rows in diffusers' order [uncond, text]: uncond + g (text - uncond)."""

    scale: float
    ROWS = (Row("uncond", text=False), Row("text", text=True))

    def combine(self, prediction):
        r = self.rows(prediction)
        return r["uncond"] + self.scale * (r["text"] - r["uncond"])


@dataclasses.dataclass(frozen=True)
class EditGuidance(Guidance):
    """InstructPix2Pix / MGIE 3-way guidance, rows in diffusers' order [text, image, uncond]:
    uncond + g (text - image) + g_img (image - uncond); the image-only and unconditional rows see
    the null text, the unconditional row no image either."""

    text_scale: float
    image_scale: float
    ROWS = (Row("text", text=True), Row("image", text=False), Row("uncond", text=False, image=False))

    def combine(self, prediction):
        r = self.rows(prediction)
        return r["uncond"] + self.text_scale * (r["text"] - r["image"]) + self.image_scale * (r["image"] - r["uncond"])


# -- argument checks ------------------------------------------------------------------------------

def describe(value) -> str:
    """A short description of a bad argument for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (str, numbers.Number)) else type(value).__name__


def _positive_int(name, value, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PipelineError(name, f"expected a positive integer, got {describe(value)}")
    if maximum is not None and value > maximum:
        raise PipelineError(name, f"expected at most {maximum}, got {value}")
    return int(value)


MAX_GUIDANCE = 100.0  # far past any useful scale (SD: 7.5; 20-30 already burns images); 1e30 gave flat gray


def _scale(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= MAX_GUIDANCE:
        raise PipelineError(name, f"expected a number in 0..{MAX_GUIDANCE:g}, got {describe(value)}")
    return float(value)


def _text(name, value):
    if not isinstance(value, str):
        raise PipelineError(name, f"expected a string, got {describe(value)}")
    return value


def _embeds(name, value, ranks=(2, 3)):
    """A float tensor of one of `ranks` ((L, D) or (1, L, D); pooled: (P,) or (1, P)), batch 1 at the
    higher rank, with finite values."""
    shapes = "(L, D) or (1, L, D)" if ranks == (2, 3) else "(P,) or (1, P)"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in ranks \
            or (value.dim() == ranks[-1] and value.shape[0] != 1) or 0 in value.shape:
        raise PipelineError(name, f"expected a float {shapes} tensor, got {describe(value)}")
    if not torch.isfinite(value).all():
        raise PipelineError(name, "contains NaN or infinite values")
    return value


def _int_pair(name, value, least: int) -> tuple[int, int]:
    """Two integers >= least, as a tuple (SDXL's size/crop ids: (height, width) or (top, left))."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least for v in value):
        raise PipelineError(name, f"expected two integers >= {least} (as diffusers: (height, width), or (top, left) "
                            f"for crops_coords_top_left), got {describe(value)}")
    return int(value[0]), int(value[1])


def _latents(name, value):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (3, 4):
        raise PipelineError(name, f"expected a float (N, C, h, w) tensor, got {describe(value)}")
    if not torch.isfinite(value).all():
        raise PipelineError(name, "contains NaN or infinite values")
    return value


def _seed(value, generator) -> int | None:
    """A given seed, or a fresh one drawn now so the request records the seed it ran with (none
    when generators are given: they are the source of noise)."""
    if value is None:
        return None if generator is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    if generator is not None:
        raise PipelineError("seed", "give at most one of seed, generator")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
        raise PipelineError("seed", f"expected a non-negative integer or None, got {describe(value)}")
    return int(value)


def _generators(value, count: int):
    """None, one torch.Generator (shared by every image, drawn from in image order, as diffusers
    draws a batch from one generator), or a list of `count` generators, one per image."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        if len(value) != count:
            raise PipelineError("generator", f"expected one generator per image ({count}), got {len(value)}")
        return list(value)
    raise PipelineError("generator", f"expected a torch.Generator or a list of them, got {describe(value)}")


def _set(request, name, value):
    object.__setattr__(request, name, value)  # normalising a frozen dataclass's own field


# -- the requests -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class _Sampling:
    """What generate and edit share. None takes the model's default (`pipe.defaults`, from its
    scheduler config and its authors' settings).

    steps: denoising steps (alias num_inference_steps, diffusers' name). guidance_scale: text
    guidance (SD/InstructPix2Pix: 7.5). sampler: a fastdiff.samplers name (default: the scheduler
    config's class). num_images: images per prompt (diffusers' num_images_per_prompt). seed:
    image i uses a generator seeded with seed + i (None: drawn when the request is built);
    generator: a torch.Generator or one per image instead of seed, as diffusers' `generator=`.
    output_type: "pil" (PIL images), "np" ((N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W) in [0, 1])
    or "latent" (the final latents, undecoded). callback_on_step_end: diffusers' hook,
    called after every step as fn(pipe, step_index, timestep, {"latents": (N, C, h, w)}); a dict
    it returns with "latents" replaces them.

    cache_interval, cache_depth: DeepCache (Ma et al., 2023): steps 0, N, 2N, ... of cache_interval=N
    run the whole UNet and keep its deep features; the steps between run only the cache_depth
    outermost resolution levels (their down and up blocks), the deeper ones replaced by those
    features. 1 (the default) runs every step in full. cache_depth: 1 up to the UNet's levels
    (checked by Pipeline.resolve); more levels cost more and stay closer to the uncached image.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    num_images: int = 1
    seed: int | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"
    callback_on_step_end: Callable | None = None
    cache_interval: int | None = None
    cache_depth: int | None = None

    @property
    def total_images(self) -> int:
        return self.num_images

    def _check_sampling(self) -> None:
        if self.steps is not None:
            _set(self, "steps", _positive_int("steps", self.steps))
        if self.guidance_scale is not None:
            _set(self, "guidance_scale", _scale("guidance_scale", self.guidance_scale))
        for name in ("cache_interval", "cache_depth"):
            if getattr(self, name) is not None:
                _set(self, name, _positive_int(name, getattr(self, name)))
        if self.sampler is not None and not isinstance(self.sampler, str):
            raise PipelineError("sampler", f"expected a sampler name or None, got {describe(self.sampler)}")
        if self.output_type not in OUTPUT_TYPES:
            raise PipelineError("output_type", f"expected one of {OUTPUT_TYPES}, got {describe(self.output_type)}")
        if self.callback_on_step_end is not None and not callable(self.callback_on_step_end):
            raise PipelineError("callback_on_step_end", f"expected a callable, got {describe(self.callback_on_step_end)}")
        _set(self, "num_images", _positive_int("num_images", self.num_images))
        _set(self, "generator", _generators(self.generator, self.total_images))
        _set(self, "seed", _seed(self.seed, self.generator))
        if self.latents is not None and (_latents("latents", self.latents).dim() != 4
                                         or self.latents.shape[0] != self.total_images):
            raise PipelineError("latents", f"expected a float tensor of shape ({self.total_images}, C, h, w): one "
                                f"initial noise per image, got {describe(self.latents)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateRequest(_Sampling):
    """Text to image (fields shared with edit: see _Sampling).

    prompt: a string or a list of them (num_images each), or prompt_embeds (L, D) / (1, L, D);
    negative_prompt (default "", or one per prompt) or negative_prompt_embeds for the
    unconditional branch (used when guidance_scale > 1). height, width: default the UNet's
    sample size times the VAE factor (512 for SD1.5, 1024 for SDXL). latents: (images, C, h, w)
    initial noise before the sampler's init_noise_sigma, as diffusers' `latents=`.

    SDXL only (diffusers' StableDiffusionXLPipeline names): pooled_prompt_embeds (P,) / (1, P), needed
    with prompt_embeds (negative_pooled_prompt_embeds with negative_prompt_embeds); the size/crop ids
    original_size and target_size ((height, width), default the image's) and crops_coords_top_left
    ((top, left), default (0, 0)), the same for every guidance branch. Without a negative prompt,
    SDXL's unconditional branch is zeros (the folder's force_zeros_for_empty_prompt, as diffusers).
    """

    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    height: int | None = None
    width: int | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None

    def __post_init__(self):
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise PipelineError("prompt", "give exactly one of prompt, prompt_embeds")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise PipelineError("negative_prompt", "give at most one of negative_prompt, negative_prompt_embeds")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise PipelineError(name, "expected a string or a non-empty list of strings, got an empty list")
                _set(self, name, [_text(name, text) for text in value])
            elif value is not None:
                _text(name, value)
        if isinstance(self.negative_prompt, list) and len(self.negative_prompt) != len(self.prompts):
            raise PipelineError("negative_prompt", f"expected one per prompt ({len(self.prompts)}), "
                                f"got {len(self.negative_prompt)}")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            if getattr(self, name) is not None:
                _embeds(name, getattr(self, name))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _set(self, name, _positive_int(name, getattr(self, name)))
        for name, embeds in (("pooled_prompt_embeds", "prompt_embeds"),
                             ("negative_pooled_prompt_embeds", "negative_prompt_embeds")):
            if getattr(self, name) is not None:
                if getattr(self, embeds) is None:
                    raise PipelineError(name, f"only with {embeds} (the text encoder computes both from a prompt)")
                _embeds(name, getattr(self, name), ranks=(1, 2))
        for name, least in (("original_size", 1), ("crops_coords_top_left", 0), ("target_size", 1)):
            if getattr(self, name) is not None:
                _set(self, name, _int_pair(name, getattr(self, name), least))
        self._check_sampling()

    @property
    def prompts(self) -> list:
        """One entry per prompt: the strings, or [None] when prompt_embeds condition instead."""
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images

    def negative_for(self, index: int) -> str:
        """The negative prompt of prompt `index` (diffusers' default: the empty prompt)."""
        if isinstance(self.negative_prompt, list):
            return self.negative_prompt[index]
        return self.negative_prompt or ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditRequest(_Sampling):
    """Edit `image` following an instruction (InstructPix2Pix / MGIE; shared fields: see _Sampling).

    image: a PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or float [0, 1] array, or a path; sides
    are rounded down to a multiple of the VAE factor. The instruction is one of: text
    (`instruction`, alias prompt), `instruction_embeds` (L, D), or `img_hidden_states` (8, 4096):
    an MLLM's [IMG] states mapped by MGIE's edit head. The unconditional text is negative_prompt
    (default "", as InstructPix2Pix) or negative_instruction_embeds; MGIE's is its edit head
    applied to zeros. Guidance is 3-way, on when guidance_scale > 1 and image_guidance_scale >= 1
    (diffusers' rule); image_guidance_scale defaults to 1.5 (InstructPix2Pix/MGIE).
    """

    image: object
    instruction: str | None = None
    negative_prompt: str | None = None
    instruction_embeds: torch.Tensor | None = None
    negative_instruction_embeds: torch.Tensor | None = None
    img_hidden_states: torch.Tensor | None = None
    image_guidance_scale: float | None = None

    def __post_init__(self):
        given = [n for n in ("instruction", "instruction_embeds", "img_hidden_states") if getattr(self, n) is not None]
        if len(given) != 1:
            raise PipelineError("instruction", "give exactly one of instruction, instruction_embeds, img_hidden_states "
                                f"(got {given or 'none'})")
        for name in ("instruction", "negative_prompt"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        for name in ("instruction_embeds", "negative_instruction_embeds", "img_hidden_states"):
            if getattr(self, name) is not None:
                _embeds(name, getattr(self, name))
        if self.negative_prompt is not None and self.negative_instruction_embeds is not None:
            raise PipelineError("negative_prompt", "give at most one of negative_prompt, negative_instruction_embeds")
        if self.img_hidden_states is not None and (self.negative_instruction_embeds is not None
                                                   or self.negative_prompt is not None):
            raise PipelineError("negative_prompt", "not with img_hidden_states (MGIE's null conditioning is its edit "
                                "head applied to zeros)")
        if not isinstance(self.image, (Image.Image, np.ndarray, str, os.PathLike)):
            raise PipelineError("image", f"expected a PIL image, a numpy array or a path, got {type(self.image).__name__}")
        if self.image_guidance_scale is not None:
            _set(self, "image_guidance_scale", _scale("image_guidance_scale", self.image_guidance_scale))
        self._check_sampling()


Request = GenerateRequest | EditRequest


def choose_guidance(request: Request) -> Guidance:
    """The guidance of a request whose scales are filled in, by diffusers' rule
    (do_classifier_free_guidance): text guidance when guidance_scale > 1; for an edit, 3-way
    InstructPix2Pix guidance when also image_guidance_scale >= 1; else one unguided row."""
    text_scale = request.guidance_scale
    if isinstance(request, EditRequest):
        image_scale = request.image_guidance_scale
        return EditGuidance(text_scale, image_scale) if text_scale > 1 and image_scale >= 1 else NoGuidance()
    return TextGuidance(text_scale) if text_scale > 1 else NoGuidance()

# diffusers' names for fastdiff's fields, accepted where users type them
ALIASES = {"num_inference_steps": "steps", "num_images_per_prompt": "num_images"}
EDIT_ALIASES = {"prompt": "instruction"}


def build_request(request_class, **arguments) -> Request:
    """request_class(**arguments), taking diffusers' names for its fields (ALIASES) and reporting
    an unknown keyword as a PipelineError that names it."""
    aliases = {**ALIASES, **(EDIT_ALIASES if request_class is EditRequest else {})}
    for alias, field in aliases.items():
        if alias in arguments:
            value = arguments.pop(alias)
            if arguments.get(field) is not None:
                raise PipelineError(alias, f"give at most one of {alias}, {field} (the same argument)")
            arguments[field] = value
    known = {f.name for f in dataclasses.fields(request_class)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise PipelineError(unknown[0], f"not an argument of {request_class.__name__} (expected one of "
                            f"{sorted(known | set(aliases))})")
    return request_class(**arguments)


def max_pixels_limit(value) -> int:
    """A pipeline's or engine's max_pixels argument, checked."""
    return _positive_int("max_pixels", value)
