"""Shared pieces of the Triton kernels: output allocation (NaN-poisoned for tests) and dtype maps."""
from __future__ import annotations

import torch

_poison = False


def set_poison_outputs(on: bool) -> None:
    """Fill every output with NaN before a kernel writes it, so unwritten elements fail tests."""
    global _poison
    _poison = bool(on)


def new_output(shape, *, like: torch.Tensor, dtype=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)
    if _poison:
        out.fill_(float("nan"))
    return out
