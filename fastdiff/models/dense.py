"""Dense products of fastdiff's models (Linear, 1x1 and kxk Conv2d), with the module's own weight.

On the CPU, in fp32 or bf16, they run through torch's oneDNN entry points
(`mkldnn._linear_pointwise`, `mkldnn._convolution_pointwise`) with the weight reordered once into
oneDNN's blocked layout and cached per module: no per-call weight reorder, bias fused into the
GEMM (aten::addmm first copies the bias into the output), and an optional residual added by the
GEMM's epilogue (binary "add" post-op) instead of a separate aten::add pass over the output.
torch's fp32 Linear goes through MKL, about half oneDNN's speed on AMD Zen 4. Under the
reference backend (fastdiff.ops.use_backend("reference")) they are plain F.linear / F.conv2d.

The cache key holds the weight's storage, version, dtype and device, so `.to()`, `load_state_dict`
or an in-place weight update repack on the next call. The packed copy is extra memory (the
parameter stays, for state_dict). Elsewhere (CUDA, fp16, autograd, bf16 on CPUs where oneDNN has
no bf16 path: without AVX-512 or AVX-NE-CONVERT its weight reorder raises) the plain F.linear / F.conv2d,
and so under torch.compile, where inductor generates the products itself.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops

__all__ = ["linear", "conv2d"]

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# module -> (weight key, packed weight). Outside the module: oneDNN's opaque tensors cannot be
# deep-copied or pickled, so a copy.deepcopy(model) must not see them (a copy repacks on first use).
_packed_weights: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@functools.cache
def _onednn_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN where it pays; plain torch under the reference backend, so that a model run there is
    plain PyTorch throughout (the demo's comparison, the MAC counter's view of the products)."""
    if torch.compiler.is_compiling():  # traced: plain products for inductor (no packing cache, no graph break)
        return False
    return (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype
            and (x.dtype != torch.bfloat16 or _onednn_bf16())
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and torch.backends.mkldnn.is_available() and ops.selected_name("cpu") != "reference")


def _weight_key(weight: torch.Tensor) -> tuple:
    try:
        version = weight._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be updated in place)
        version = -1
    return weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape)


def _packed(module: nn.Module, weight: torch.Tensor, pack) -> torch.Tensor:
    """module's weight in oneDNN's layout, packed on first use and again whenever the weight changed."""
    key = _weight_key(weight)
    cached = _packed_weights.get(module)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight))
        _packed_weights[module] = cached
    return cached[1]


def linear(x: torch.Tensor, module: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """module (an nn.Linear, or a 1x1 nn.Conv2d on tokens) applied to x (..., I) -> (..., O),
    plus `residual` (same shape as the output) when given."""
    weight = module.weight
    if weight.dim() == 4:
        weight = weight.flatten(1)  # (O, I, 1, 1) -> (O, I): a view
    if not _use_onednn(x, weight):
        out = F.linear(x, weight, module.bias)
        return out if residual is None else out + residual
    packed = _packed(module, weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None))
    x = x.contiguous()
    if residual is None or residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype:
        out = torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
        return out if residual is None else out + residual
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), packed, module.bias, "add")


def conv2d(x: torch.Tensor, module: nn.Conv2d, residual: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """module (an nn.Conv2d) applied to the (B, C, H, W) map x, plus `residual`
    (the output's shape) when given. `bias` replaces module.bias (e.g. with a time embedding folded
    in). The output is channels_last."""
    bias = module.bias if bias is None else bias
    padding, stride, dilation = module.padding, module.stride, module.dilation
    if isinstance(padding, str) or module.padding_mode != "zeros" or not _use_onednn(x, module.weight):
        out = module._conv_forward(x, module.weight, bias)
        return out if residual is None else out + residual
    padding, stride, dilation, groups = list(padding), list(stride), list(dilation), module.groups
    packed = _packed(module, module.weight, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w.detach().contiguous(memory_format=torch.channels_last), padding, stride, dilation, groups, list(x.shape)))
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op on the models' maps
    fusable = (residual is not None and residual.dtype == x.dtype and residual.dim() == 4
               and residual.is_contiguous(memory_format=torch.channels_last))
    if fusable:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, padding, stride, dilation, groups,
                                                              "add", None, None, [], None)
    out = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, "none", [], "")
    return out if residual is None else out + residual
