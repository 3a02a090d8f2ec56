"""The C++ backend's dense products (linear, conv2d) on the CPU: torch's oneDNN, with the reference
twins' signatures. It needs no compiled C++ extension, so a failed C++ build leaves these products fast.

Each weight is reordered once into oneDNN's blocked layout and cached: no per-call weight reorder,
bias fused into the GEMM (aten::addmm first copies the bias into the output), and a residual added
by the GEMM's epilogue (binary "add" post-op) instead of a separate pass over the output. torch's
fp32 Linear goes through MKL, about half oneDNN's speed on AMD Zen 4. torch has no public API for
prepacked oneDNN weights, so these are its `torch.ops.mkldnn` entry points (those torch.compile's
CPU freezing pass uses).

The cache holds each weight weakly, keyed by its stamp (fastdiff.ops._packing: storage, place in
it, version counter), dtype, device and shape (and the convolution's geometry), so `.to()`,
`load_state_dict` or an in-place update repack on the next call; a weight without a stamp (an
inference tensor: no version counter) is packed on every call. The packed copy is extra memory and
lives outside the modules (oneDNN's opaque tensors cannot be deep-copied or pickled, so a
copy.deepcopy(model) must not see them). Dtypes oneDNN does not run
here (fp16; bf16 without a oneDNN bf16 path: hardware.onednn_dtypes) run on the reference twin.
"""
from __future__ import annotations

import weakref

import torch

from fastdiff import hardware

from . import reference
from ._packing import stamp

if not hardware.onednn_dtypes():
    raise ImportError("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")

# id(weight) -> (weak reference to it, its key, the packed weight)
_packed_weights: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in hardware.onednn_dtypes() and weight.dtype == x.dtype and x.numel() > 0


def _packed(weight: torch.Tensor, geometry: tuple, pack) -> torch.Tensor:
    """`weight` in oneDNN's layout, packed on first use and again whenever it changed."""
    weight_stamp = stamp(weight)
    if weight_stamp is None:
        return pack(weight.detach())
    key = (weight_stamp, weight.dtype, weight.device, tuple(weight.shape), geometry)
    entry = _packed_weights.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    packed = pack(weight.detach())
    ident = id(weight)
    _packed_weights[ident] = (weakref.ref(weight, lambda _: _packed_weights.pop(ident, None)), key, packed)
    return packed


def linear(x, weight, bias=None, residual=None):
    if not _runs(x, weight):
        return reference.linear(x, weight, bias, residual=residual)
    packed = _packed(weight, ("linear",),
                     lambda w: torch.ops.mkldnn._reorder_linear_weight(w.flatten(1).contiguous(), None))
    x = x.contiguous()
    if residual is None or residual.dtype != x.dtype:
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return out if residual is None else out + residual
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), packed, bias, "add")


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def conv2d(x, weight, bias=None, residual=None, *, stride=1, padding=0, dilation=1, groups=1):
    if not _runs(x, weight):
        return reference.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                residual=residual)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    packed = _packed(weight, ("conv2d", *stride, *padding, *dilation, groups),
                     lambda w: torch.ops.mkldnn._reorder_convolution_weight(
                         w.contiguous(memory_format=torch.channels_last), padding, stride, dilation, groups,
                         list(x.shape)))
    x = x.contiguous(memory_format=torch.channels_last)  # a no-op on the models' maps
    if residual is not None and residual.dtype == x.dtype and residual.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, padding, stride, dilation,
                                                              groups, "add", None, None, [], None)
    out = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, "none", [], "")
    return out if residual is None else (out + residual).contiguous(memory_format=torch.channels_last)
