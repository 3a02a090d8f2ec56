"""Triton GPU kernels (installed as fastdiff.kernels), same signatures as fastdiff.ops.reference.

Run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
"""
from .attention import attention
from .glu import glu
from .group_norm import group_norm
from ._common import set_poison_outputs
from .separable_conv import separable_conv2d

__all__ = ["attention", "glu", "group_norm", "separable_conv2d", "set_poison_outputs"]
