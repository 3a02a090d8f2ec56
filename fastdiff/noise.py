"""Gaussian noise drawn as diffusers draws it, shared by the samplers and the VAE (a leaf module:
models must not depend on the samplers)."""
from __future__ import annotations

import torch

__all__ = ["randn"]


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' `randn_tensor`: one generator draws the whole
    tensor; a list of generators draws one batch row each; a CPU generator draws on the CPU."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: expected one generator per batch row ({shape[0]}), got {len(generator)}")
        if len(generator) == 1:
            generator = generator[0]
        else:
            return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None and generator.device.type == "cpu" else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)
