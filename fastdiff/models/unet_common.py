"""What the pipelines rely on in every fastdiff UNet (UNet2DCondition, MobileDiffusionUNet): the
same attributes and one input rule for forward(sample, timestep, encoder_hidden_states)."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

__all__ = ["ConditionalUNet"]


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class ConditionalUNet(nn.Module):
    """Base of the text-conditioned UNets. Subclasses have `config` (with in_channels and
    out_channels), `conv_in`, and define `cross_attention_dim`.

    Input rule of forward:
      sample                 floating (B, in_channels, H, W), any H, W >= 1
      timestep               a number, a 1-element tensor, or a (B,) tensor
      encoder_hidden_states  floating (B, L, cross_attention_dim), L >= 1
    Tensors must be on the model's device; floating inputs of another dtype are cast to the
    model's. A non-tensor or non-floating input raises TypeError, a wrong shape or device
    ValueError, each naming the argument.
    """

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def cross_attention_dim(self) -> int:
        """Width of the text conditioning (encoder_hidden_states' last dimension)."""
        raise NotImplementedError

    def _check_inputs(self, sample, timestep, encoder_hidden_states) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample channels_last in the model's dtype, timesteps (B,), context in the model's dtype)."""
        C, D = self.in_channels, self.cross_attention_dim
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample: expected a floating-point (B, {C}, H, W) tensor, got {describe(sample)}")
        if sample.dim() != 4 or sample.shape[1] != C or sample.numel() == 0:
            raise ValueError(f"sample: expected shape (B, {C}, H, W) (config in_channels {C}), got {tuple(sample.shape)}")
        B = sample.shape[0]
        if not isinstance(encoder_hidden_states, torch.Tensor) or not encoder_hidden_states.is_floating_point():
            raise TypeError(f"encoder_hidden_states: expected a floating-point ({B}, L, {D}) tensor, got {describe(encoder_hidden_states)}")
        shape = tuple(encoder_hidden_states.shape)
        if len(shape) != 3 or shape[0] != B or shape[1] < 1 or shape[2] != D:
            raise ValueError(f"encoder_hidden_states: expected shape ({B}, L, {D}) for a batch of {B} "
                             f"(config cross_attention_dim {D}), got {shape}")
        for name, t in (("sample", sample), ("encoder_hidden_states", encoder_hidden_states)):
            if t.device != self.device:
                raise ValueError(f"{name}: on {t.device}, the model is on {self.device}")

        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 1 and timestep.dim() <= 1:
                timestep = timestep.reshape(1).expand(B)
            elif timestep.shape != (B,):
                raise ValueError(f"timestep: expected a number, a 1-element tensor or a ({B},) tensor, got shape {tuple(timestep.shape)}")
            timestep = timestep.to(self.device)
        elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
            timestep = torch.full((B,), float(timestep), dtype=torch.float32, device=self.device)
        else:
            raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")

        sample = sample.to(dtype=self.dtype, memory_format=torch.channels_last)
        return sample, timestep, encoder_hidden_states.to(self.dtype)
