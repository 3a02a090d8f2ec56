"""Module-level `fastdiff.generate(...)` and `fastdiff.edit(...)`.

The model is `model=` or $FASTDIFF_MODEL: a diffusers-format folder, or the name of an embedded
default (see fastdiff.default_model): "toyworld" (the default, trained on fastdiff.toyworld's
128x128 scenes), or the UNTRAINED "mobilediffusion" and "small" (for timing). dtype: None
(float32), a torch.dtype or "fp32"/"bf16"/... (see fastdiff.requests.resolve_dtype). quantize:
None, or "int8" for the UNet's linear and 1x1 convolution weights (Pipeline.quantize). Loaded
pipelines are cached per (model, kind, dtype, quantize); first calls from several threads at once build
one pipeline between them.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

from fastdiff.default_model import MODELS, TRAINED, default_pipeline
from fastdiff.pipeline import Pipeline
from fastdiff.quantization import check_quantize
from fastdiff.requests import PipelineError, resolve_dtype

DEFAULT_MODEL = TRAINED
# One load at a time: concurrent first calls would each build the pipeline (the caches below
# only remember finished loads), and transformers' lazy imports race between threads.
_loading = threading.Lock()


@functools.lru_cache(maxsize=4)
def _folder_pipeline(folder: str, dtype: torch.dtype, quantize: str | None) -> Pipeline:
    return Pipeline.from_pretrained(folder, dtype=dtype, quantize=quantize)


def get_pipeline(model: str | os.PathLike | None, kind: str, dtype=None, quantize=None) -> Pipeline:
    """The pipeline for `model` (see the module docstring); kind "generate" or "edit" picks the
    embedded default's text-to-image model or its editor."""
    check_quantize(quantize)
    dtype = resolve_dtype(dtype)
    source = "model"
    if model is None:
        model, source = os.environ.get("FASTDIFF_MODEL") or DEFAULT_MODEL, "FASTDIFF_MODEL"
    if str(model) not in MODELS and not os.path.isdir(model):
        raise PipelineError(source, f"{os.fspath(model)!r} is neither an embedded default ({', '.join(MODELS)}) "
                            f"nor a diffusers pipeline folder")
    with _loading:
        if str(model) in MODELS:
            return default_pipeline(kind, str(model), dtype, quantize=quantize)
        return _folder_pipeline(os.fspath(model), dtype, quantize)


def generate(prompt=None, *, model=None, dtype=None, quantize=None, **options):
    """Text to image with `model` (see get_pipeline); options as Pipeline.generate. Returns PIL images."""
    return get_pipeline(model, "generate", dtype, quantize).generate(prompt, **options)


def edit(image, instruction=None, *, model=None, dtype=None, quantize=None, **options):
    """Edit `image` with `model` (see get_pipeline); options as Pipeline.edit. Returns a PIL image."""
    return get_pipeline(model, "edit", dtype, quantize).edit(image, instruction, **options)
