"""Images in and out: PIL images, arrays or files <-> the VAE's (N, 3, H, W) tensors in [-1, 1]."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

from fastdiff.requests import PipelineError


FLOAT_SLACK = 1e-3  # float images a little outside [0, 1] (a resampler's overshoot) are clipped, not refused


def _check_pixels(width: int, height: int, max_pixels: int | None, source: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise PipelineError("image", f"{source}{width}x{height} ({width * height:,} pixels), over the limit of "
                            f"{max_pixels:,} (max_pixels)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as an image viewer shows it: integer modes wider than 8 bits (16-bit PNGs open as I;16 or
    I) are scaled to 8 bits, where PIL's convert would clip every value over 255 to white."""
    if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max(initial=0) > 255):
        array = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(np.clip(array, 0, 65535) * (255 / 65535)).astype(np.uint8))
    return image.convert("RGB")


def _decode(source, max_pixels: int | None, label: str, formats) -> Image.Image:
    """A file (path or its bytes) -> RGB; the size is checked from the header before any pixel is
    decoded (a decompression bomb is refused without inflating it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats) as opened:
                _check_pixels(*opened.size, max_pixels, label)
                opened.load()
                return _to_rgb(opened)
    except PipelineError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        where = "" if isinstance(source, bytes) else f"{source!r} "
        raise PipelineError("image", f"{where}refused by PIL's decompression-bomb check ({exc})") from None
    except Exception as exc:  # untrusted bytes: PIL's decoders raise OSError, SyntaxError, EOFError, struct.error...
        if not isinstance(source, bytes):
            raise PipelineError("image", f"cannot read {source!r} as an image ({exc})") from None
        raise PipelineError("image", f"not a readable {'/'.join(formats or ('PIL',))} image") from None


def load_image(image, *, max_pixels: int | None = None, formats: tuple[str, ...] | None = None) -> Image.Image:
    """A PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or float [0, 1] array, a path, or the bytes
    of an image file (formats: the PIL formats accepted for files, default any) -> an RGB PIL image.

    A file's size is checked against max_pixels from its header, before it is decoded; PIL's
    decompression-bomb check becomes a PipelineError too. 16-bit images are scaled to 8 bits.
    """
    if isinstance(image, bytes):
        return _decode(image, max_pixels, "", formats)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return _decode(path, max_pixels, f"{path!r} is ", formats)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise PipelineError("image", f"expected an HxW or HxWxC (C = 1, 3, 4) array, got shape {image.shape}")
        _check_pixels(array.shape[1], array.shape[0], max_pixels, "")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise PipelineError("image", "the array contains NaN or infinite values")
            low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
            if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:  # e.g. 0..255 values in a float array: never clip to white
                raise PipelineError("image", f"a float array must hold values in [0, 1], got {low:g}..{high:g} "
                                    f"(for 0..255 values pass a uint8 array, or divide by 255)")
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            raise PipelineError("image", f"expected a uint8 array or a float array in [0, 1], got dtype {array.dtype}")
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if isinstance(image, Image.Image):
        _check_pixels(*image.size, max_pixels, "")
        return _to_rgb(image)
    raise PipelineError("image", "expected a PIL image, a numpy array, a path or an image file's bytes, "
                        f"got {type(image).__name__}")


def image_to_tensor(image: Image.Image, multiple: int) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) in [-1, 1], sides rounded down to `multiple` (as diffusers' VaeImageProcessor)."""
    width, height = (side - side % multiple for side in image.size)
    if width == 0 or height == 0:
        raise PipelineError("image", f"{image.size[0]}x{image.size[1]} is smaller than the model's {multiple}-pixel grid")
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
