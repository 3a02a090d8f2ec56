"""Module-level `fastdiff.generate(...)` and `fastdiff.edit(...)`.

The model is `model=` or $FASTDIFF_MODEL: a diffusers-format folder, or the name of an embedded
default ("mobilediffusion", the default; "small" for quick runs), whose weights are UNTRAINED
(see fastdiff.default_model). Loaded pipelines are cached per (model, kind, dtype).
"""
from __future__ import annotations

import functools
import os

import torch

from fastdiff.default_model import _SIZES, default_pipeline
from fastdiff.pipeline import Pipeline


@functools.lru_cache(maxsize=4)
def _folder_pipeline(folder: str, dtype: torch.dtype) -> Pipeline:
    return Pipeline.from_pretrained(folder, dtype=dtype)


def get_pipeline(model: str | os.PathLike | None, kind: str, dtype: torch.dtype = torch.float32) -> Pipeline:
    """The pipeline for `model` (see the module docstring); kind "generate" or "edit" picks the
    embedded default's text-to-image model or its editor."""
    model = model if model is not None else os.environ.get("FASTDIFF_MODEL") or "mobilediffusion"
    if str(model) in _SIZES:
        return default_pipeline(kind, str(model), dtype)
    return _folder_pipeline(os.fspath(model), dtype)


def generate(prompt=None, *, model=None, dtype=torch.float32, **kwargs):
    """Text to image with `model` (see get_pipeline); kwargs as Pipeline.generate. Returns PIL images."""
    return get_pipeline(model, "generate", dtype).generate(prompt, **kwargs)


def edit(image, instruction=None, *, model=None, dtype=torch.float32, **kwargs):
    """Edit `image` with `model` (see get_pipeline); kwargs as Pipeline.edit. Returns a PIL image."""
    return get_pipeline(model, "edit", dtype).edit(image, instruction, **kwargs)
