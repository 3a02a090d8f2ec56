"""Images in and out: PIL images, arrays or files <-> the VAE's (N, 3, H, W) tensors in [-1, 1]."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from fastdiff.requests import PipelineError


def _check_pixels(width: int, height: int, max_pixels: int | None, source: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise PipelineError(f"image: {source}{width}x{height} ({width * height:,} pixels), over the limit of "
                            f"{max_pixels:,} (max_pixels)")


def load_image(image, *, max_pixels: int | None = None) -> Image.Image:
    """A PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or float [0, 1] array, or a path -> an RGB PIL image.

    A file's size is checked against max_pixels from its header, before it is decoded; PIL's
    decompression-bomb check becomes a PipelineError too.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    _check_pixels(*opened.size, max_pixels, f"{path!r} is ")
                    opened.load()
                    image = opened.copy()
        except PipelineError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PipelineError(f"image: {path!r} refused by PIL's decompression-bomb check ({exc})") from None
        except (OSError, ValueError) as exc:
            raise PipelineError(f"image: cannot read {path!r} as an image ({exc})") from None
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise PipelineError(f"image: expected an HxW or HxWxC (C = 1, 3, 4) array, got shape {image.shape}")
        _check_pixels(array.shape[1], array.shape[0], max_pixels, "")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise PipelineError("image: the array contains NaN or infinite values")
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            raise PipelineError(f"image: expected a uint8 array or a float array in [0, 1], got dtype {array.dtype}")
        image = Image.fromarray(np.ascontiguousarray(array))
    elif isinstance(image, Image.Image):
        _check_pixels(*image.size, max_pixels, "")
    else:
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
    """(B, 3, H, W) in [-1, 1] -> PIL images ("pil"), a (B, H, W, 3) float array ("np") or a
    (B, 3, H, W) float tensor ("pt"), in [0, 1] (diffusers' VaeImageProcessor.postprocess)."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
