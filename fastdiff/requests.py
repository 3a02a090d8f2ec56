"""Requests as values: what one `generate` or `edit` call asks for, checked once when built.

    request = GenerateRequest(prompt="a red bicycle", steps=25, seed=0)
    images = pipe.run(request)                       # == pipe.generate("a red bicycle", steps=25, seed=0)
    future = engine.submit(EditRequest(image="in.png", instruction="make it snowy"))

Every entry point (Pipeline.generate/edit, Engine.submit_*, fastdiff.generate/edit, the CLI)
builds one of these dataclasses, so a bad argument fails at the door with one line naming it,
before any model work. What depends on the model (its defaults, its VAE factor, its pixel limit,
the sampler's step range) is checked by `Pipeline.resolve(request)`, still before any
allocation. This module is a leaf: it imports nothing else from fastdiff.

The guidance objects own the row layout of the UNet batch and the combine over those rows, so
the order (diffusers': [uncond, text] for text CFG, [text, image, uncond] for InstructPix2Pix)
is written once, here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

# Requests larger than this many output pixels are refused before any allocation (4 megapixels:
# 2048x2048; SD1.5's native size is 512x512). Pipelines and engines take max_pixels= to change it.
DEFAULT_MAX_PIXELS = 4 * 1024 * 1024

OUTPUT_TYPES = ("pil", "np")


class PipelineError(ValueError):
    """A model folder or argument the pipeline cannot use; the message names it and says what was expected."""


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Per-model sampling defaults (the model's scheduler config and its authors' settings)."""

    steps: int = 50  # StableDiffusionPipeline's default
    guidance_scale: float = 7.5  # SD's and InstructPix2Pix/MGIE's text scale
    image_guidance_scale: float = 1.5  # InstructPix2Pix/MGIE's image scale
    sampler: str | None = None  # None: the scheduler config's class
    size: int = 512  # image side in pixels: the UNet's sample_size times the VAE's factor


# -- dtype: settled once, where a model is loaded -------------------------------------------------

_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}
# fastdiff's C++ kernels run fp32 and bf16; fp16 only where Triton runs it (CUDA).
_DEVICE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def resolve_dtype(dtype, device=None, *, name: str = "dtype") -> torch.dtype:
    """None (float32), a torch.dtype or one of "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"
    -> the torch.dtype, refused with PipelineError when `device` (default CPU) cannot run it."""
    if dtype is None:
        resolved = torch.float32
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        resolved = _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    else:
        raise PipelineError(f"{name}: expected a torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {describe(dtype)}")
    device_type = torch.device(device if device is not None else "cpu").type
    runnable = _DEVICE_DTYPES.get(device_type, (torch.float32,))
    if resolved not in runnable:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in runnable)
        raise PipelineError(f"{name}: {str(resolved).removeprefix('torch.')} does not run on {device_type} "
                            f"(fastdiff runs {allowed} there)")
    return resolved


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

    def context(self, text: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        """(1, L, D) conditioning and null conditioning -> (branches, L, D) in row order."""
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
        raise PipelineError(f"{name}: expected a positive integer, got {describe(value)}")
    if maximum is not None and value > maximum:
        raise PipelineError(f"{name}: expected at most {maximum}, got {value}")
    return int(value)


def _scale(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise PipelineError(f"{name}: expected a finite number >= 0, got {describe(value)}")
    return float(value)


def _text(name, value):
    if not isinstance(value, str):
        raise PipelineError(f"{name}: expected a string, got {describe(value)}")
    return value


def _embeds(name, value, ranks=(2, 3)):
    """A float tensor of one of `ranks`, batch 1 when rank 3, with finite values."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in ranks \
            or (value.dim() == 3 and value.shape[0] != 1) or 0 in value.shape:
        raise PipelineError(f"{name}: expected a float (L, D) or (1, L, D) tensor, got {describe(value)}")
    if not torch.isfinite(value).all():
        raise PipelineError(f"{name}: contains NaN or infinite values")
    return value


def _latents(name, value):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (3, 4):
        raise PipelineError(f"{name}: expected a float (N, C, h, w) tensor, got {describe(value)}")
    if not torch.isfinite(value).all():
        raise PipelineError(f"{name}: contains NaN or infinite values")
    return value


def _seed(value) -> int:
    """A given seed, or a fresh one drawn now so the request records the seed it ran with."""
    if value is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
        raise PipelineError(f"seed: expected a non-negative integer or None, got {describe(value)}")
    return int(value)


def _set(request, name, value):
    object.__setattr__(request, name, value)  # normalising a frozen dataclass's own field


# -- the requests -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """Text to image.

    prompt, or prompt_embeds (L, D) / (1, L, D); negative_prompt (default "") or
    negative_prompt_embeds for the unconditional branch. steps, guidance_scale, sampler, height,
    width: None takes the model's (guidance_scale <= 1 runs without guidance). seed: image i uses
    seed + i (None: drawn when the request is built). latents: (num_images, C, h, w) initial noise
    before the sampler's init_noise_sigma, as diffusers' `latents=`.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    sampler: str | None = None
    num_images: int = 1
    latents: torch.Tensor | None = None
    output_type: str = "pil"

    def __post_init__(self):
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise PipelineError("prompt: give exactly one of prompt, prompt_embeds")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise PipelineError("negative_prompt: give at most one of negative_prompt, negative_prompt_embeds")
        for name in ("prompt", "negative_prompt"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            if getattr(self, name) is not None:
                _embeds(name, getattr(self, name))
        _check_common(self)
        _set(self, "num_images", _positive_int("num_images", self.num_images))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _set(self, name, _positive_int(name, getattr(self, name)))
        if self.latents is not None and (_latents("latents", self.latents).dim() != 4
                                         or self.latents.shape[0] != self.num_images):
            raise PipelineError(f"latents: expected a float tensor of shape (num_images={self.num_images}, C, h, w), "
                                f"got {describe(self.latents)}")

    @property
    def kind(self) -> str:
        return "generate"

    def pixels(self, default_size: int) -> int:
        return (self.height or default_size) * (self.width or default_size) * self.num_images


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditRequest:
    """Edit `image` following an instruction (InstructPix2Pix / MGIE).

    image: a PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or float [0, 1] array, or a path; sides
    are rounded down to a multiple of the VAE factor. The instruction is one of: text
    (`instruction`), `instruction_embeds` (L, D) with the optional unconditional
    `negative_instruction_embeds` (default: the empty prompt's), or `img_hidden_states` (8, 4096):
    an MLLM's [IMG] states mapped by MGIE's edit head. Guidance is 3-way, on when
    guidance_scale > 1 and image_guidance_scale >= 1 (diffusers' rule). latents: (1, C, h, w)
    initial noise as diffusers' `latents=`. None takes the model's default.
    """

    image: object
    instruction: str | None = None
    instruction_embeds: torch.Tensor | None = None
    negative_instruction_embeds: torch.Tensor | None = None
    img_hidden_states: torch.Tensor | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"

    def __post_init__(self):
        given = [n for n in ("instruction", "instruction_embeds", "img_hidden_states") if getattr(self, n) is not None]
        if len(given) != 1:
            raise PipelineError(f"instruction: give exactly one of instruction, instruction_embeds, img_hidden_states "
                                f"(got {given or 'none'})")
        if self.instruction is not None:
            _text("instruction", self.instruction)
        for name in ("instruction_embeds", "negative_instruction_embeds", "img_hidden_states"):
            if getattr(self, name) is not None:
                _embeds(name, getattr(self, name))
        if self.negative_instruction_embeds is not None and self.img_hidden_states is not None:
            raise PipelineError("negative_instruction_embeds: not with img_hidden_states (MGIE's null conditioning is "
                                "its edit head applied to zeros)")
        if not isinstance(self.image, (Image.Image, np.ndarray, str, os.PathLike)):
            raise PipelineError(f"image: expected a PIL image, a numpy array or a path, got {type(self.image).__name__}")
        _check_common(self)
        if self.image_guidance_scale is not None:
            _set(self, "image_guidance_scale", _scale("image_guidance_scale", self.image_guidance_scale))
        if self.latents is not None and (_latents("latents", self.latents).dim() == 4 and self.latents.shape[0] != 1):
            raise PipelineError(f"latents: expected a float (1, C, h, w) tensor, got {describe(self.latents)}")

    @property
    def kind(self) -> str:
        return "edit"

    @property
    def num_images(self) -> int:
        return 1


def _check_common(request) -> None:
    """The fields generate and edit share; normalises them in place (frozen dataclass)."""
    if request.steps is not None:
        _set(request, "steps", _positive_int("steps", request.steps))
    if request.guidance_scale is not None:
        _set(request, "guidance_scale", _scale("guidance_scale", request.guidance_scale))
    if request.sampler is not None and not isinstance(request.sampler, str):
        raise PipelineError(f"sampler: expected a sampler name or None, got {describe(request.sampler)}")
    if request.output_type not in OUTPUT_TYPES:
        raise PipelineError(f"output_type: expected one of {OUTPUT_TYPES}, got {describe(request.output_type)}")
    _set(request, "seed", _seed(request.seed))


Request = GenerateRequest | EditRequest

# The public keyword lists, derived from the dataclasses (the one place they are written).
GENERATE_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateRequest))
EDIT_FIELDS = tuple(f.name for f in dataclasses.fields(EditRequest))


def build_request(request_class, **arguments) -> Request:
    """request_class(**arguments), with an unknown keyword reported as a PipelineError naming it."""
    known = {f.name for f in dataclasses.fields(request_class)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise PipelineError(f"{unknown[0]}: not an argument of {request_class.__name__} (expected one of {sorted(known)})")
    return request_class(**arguments)


def max_pixels_limit(value) -> int:
    """A pipeline's or engine's max_pixels argument, checked."""
    return _positive_int("max_pixels", value)
