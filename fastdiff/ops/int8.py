"""Int8Weight: a dense weight quantized once to int8 (W8A8), for ops.linear and ops.conv2d.

Per output channel, symmetric: scale[o] = max|w[o]| / 127 (float32), qweight = round(w / scale)
in [-127, 127] (fastdiff.ops.reference.quantize_weight_int8). The activations are quantized per
row (per token) on every call, so nothing is calibrated. Make one with ops.quantize_weight; pass it
where the float weight went. A backend that runs int8 packs qweight into its kernel's layout on
first use and keeps that copy here (`layout`): ~2 bytes per weight in all, against fp32's 4. The
copy is made again when qweight changed in place (its version counter, fastdiff.ops._packing); the
scales are read on every call.
Not a tensor and not a parameter: module.to(), state_dict() and autograd do not see it (the
modules of fastdiff.quantize keep its two tensors as buffers and make it from them).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ._packing import stamp


class Int8Weight:
    """qweight: (O, I) int8, I = the float weight's shape[1:] flattened (C * kh * kw for a
    convolution, in F.unfold's order); scale: (O,) float32; shape: the float weight's shape."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]):
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise TypeError(f"qweight: expected an (out, in) int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (qweight.shape[0],):
            raise TypeError(f"scale: expected a float32 vector of {qweight.shape[0]}, got {scale.dtype} {tuple(scale.shape)}")
        self.qweight, self.scale, self.shape = qweight, scale, tuple(shape)
        self._layouts: dict[str, tuple[tuple, object]] = {}  # key -> (qweight's stamp, layout)
        self._lock = threading.Lock()

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(kh, kw) of a convolution's weight; (1, 1) for a linear's."""
        return tuple(self.shape[2:]) if len(self.shape) == 4 else (1, 1)

    def dequantize(self) -> torch.Tensor:
        """qweight * scale in float32, in the float weight's shape (for inspection and tests)."""
        return (self.qweight.float() * self.scale[:, None]).reshape(self.shape)

    def layout(self, key: str, make: Callable[[torch.Tensor], object]):
        """The kernel layout `key`, made from qweight by `make` on the first call and kept while
        qweight is unchanged (made on every call for an inference tensor: no version counter)."""
        qweight_stamp = stamp(self.qweight)
        if qweight_stamp is None:
            return make(self.qweight)
        with self._lock:
            kept = self._layouts.get(key)
            if kept is None or kept[0] != qweight_stamp:
                kept = self._layouts[key] = (qweight_stamp, make(self.qweight))
            return kept[1]

    def __getstate__(self):  # copy.deepcopy / pickle: the tensors, not the lock
        return {"qweight": self.qweight, "scale": self.scale, "shape": self.shape}

    def __setstate__(self, state):
        self.__init__(state["qweight"], state["scale"], state["shape"])

    def __repr__(self) -> str:
        return f"Int8Weight(shape={self.shape}, device={self.device})"
