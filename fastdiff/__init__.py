"""fastdiff: a small diffusion inference runtime with its own CPU (C++) and GPU (Triton) kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
