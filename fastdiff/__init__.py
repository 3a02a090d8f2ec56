"""fastdiff: a small diffusion inference runtime with its own CPU (C++) and GPU (Triton) kernels.

Layers call only downward: pipelines -> models -> fastdiff.ops -> kernels (csrc/, kernels/).
Model classes are imported lazily so `import fastdiff` stays cheap.
"""
import importlib

__version__ = "0.1.0"

from . import ops  # noqa: E402

_LAZY = {
    "UNet2DCondition": "fastdiff.models.unet_2d_condition",
    "MobileDiffusionUNet": "fastdiff.models.mobilediffusion",
    "MobileDiffusionConfig": "fastdiff.models.mobilediffusion",
    "EditHead": "fastdiff.models.edit_head",
    "AutoencoderKL": "fastdiff.models.vae",
    "AutoencoderTiny": "fastdiff.models.autoencoder_tiny",
    "Pipeline": "fastdiff.pipeline",
    "Resolved": "fastdiff.pipeline",
    "PipelineError": "fastdiff.requests",
    "GenerateRequest": "fastdiff.requests",
    "EditRequest": "fastdiff.requests",
    "Engine": "fastdiff.engine",
    "MGIE": "fastdiff.mgie",
    "EngineClosed": "fastdiff.engine",
    "generate": "fastdiff.api",
    "edit": "fastdiff.api",
    "accelerate": "fastdiff.accelerate",
    "quantize": "fastdiff.quantization",
}

__all__ = ["ops", "__version__", "reset_warnings", *_LAZY]


def reset_warnings():
    """Let each of fastdiff's once-per-process warnings come again, once, the next time its cause
    does: a fast backend unavailable, a call its kernels do not cover, a slow dtype. For an
    application that reports warnings per job, or a test that expects one."""
    from . import requests

    ops.reset_warnings()
    requests.reset_warnings()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
