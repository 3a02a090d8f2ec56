"""Triton backend: the GPU kernels of kernels/ (importable as fastdiff.kernels), same signatures as
fastdiff.ops.reference.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
kernels/ is a plain source folder without __init__.py, so a checkout's root on sys.path never
hides an installed distribution named `kernels`; fastdiff/kernels is a link to it.
"""
from fastdiff.kernels.common import set_poison_outputs
from fastdiff.kernels.attention import attention
from fastdiff.kernels.glu import glu
from fastdiff.kernels.group_norm import group_norm
from fastdiff.kernels.separable_conv import separable_conv2d

__all__ = ["attention", "glu", "group_norm", "separable_conv2d", "set_poison_outputs"]
