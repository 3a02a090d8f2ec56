"""When a packed copy of a weight (oneDNN's blocked layout, the int8 GEMM's panels) is still the weight.

A copy may be reused while the weight's stamp is unchanged: its storage (held by a weak reference,
so a new storage can never pass for it, even at the address of a freed one: `.data = ...` and
module.to() swap storages and keep the version), where it starts in it and how it is laid out, and
torch's version counter, which every in-place change made through the tensor or a view of it
bumps, under torch.no_grad and torch.inference_mode too (load_state_dict's copy_, an optimizer's
step, mul_). Not seen, as autograd does not see them: writes through `tensor.data` (a new tensor
with its own counter: `p.data.copy_(...)`, diffusers' EMAModel.copy_to), through numpy or the raw
storage. Write through the parameter itself instead (`with torch.no_grad(): p.copy_(...)`).

An inference tensor (made under torch.inference_mode) keeps no version counter, so nothing cheap
proves a copy of it current: it has no stamp, and is packed again on every call (one warning per
process says so, and how to avoid it: make or load the model outside inference_mode).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ._dispatch import warn_once


def stamp(weight: torch.Tensor) -> tuple | None:
    """What a packed copy of `weight` must match to be reused; None when nothing can prove it (an
    inference tensor: the caller packs on every call)."""
    if weight.is_inference():
        warn_once("packing: inference tensor",
                  "fastdiff.ops: a weight made under torch.inference_mode (an inference tensor) keeps no version "
                  "counter, so an in-place change to it could not be seen: its packed copy is made again on every "
                  "call (slower). Make or load the model outside torch.inference_mode (calling it inside is fine)",
                  stacklevel=5)
        return None
    return (StorageWeakRef(weight.untyped_storage()), weight.storage_offset(), weight.stride(), weight._version)
