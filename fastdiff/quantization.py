"""fastdiff.quantize(model, dtype="int8"): a model's dense products on int8 weights (W8A8), opt-in.

Each nn.Linear, and each ungrouped 1x1 nn.Conv2d (also 3x3 and larger ones with conv3x3=True),
gets its weight replaced by ops.quantize_weight(weight): an ops.Int8Weight, quantized once, per
output channel, symmetric; every call then quantizes its input per token (per row; per output
pixel's patch for a 3x3 convolution), so no calibration is needed. The models pass module weights
to fastdiff.ops.linear / ops.conv2d, which run the int8 GEMM (C++ on the CPU: AVX-512 VNNI or
AVX2; elsewhere the exact float64 twin). The module's class becomes a subclass whose own call
goes through the same ops, for layers called as modules.

Stay in float32 (by default, `exclude`): any module under a name part "conv_in" or "conv_out"
(the UNet's first and last convolution: the latents' and the prediction's precision), or
"time_embedding", "time_emb_proj", "add_embedding", "class_embedding" (timestep and pooled
conditioning: one row per sample, nothing to gain). Never quantized: the pointwise halves of
fastdiff's fused separable convolutions (ops.separable_conv2d takes float weights), depthwise and
other grouped convolutions, and any module that is not an nn.Linear / nn.Conv2d (attention
matrices, norms, embeddings).

A quantized module keeps its int8 weight as two buffers, `qweight` (int8, (out, in * kh * kw))
and `weight_scale` (float32, (out,)), and `module.weight` is the ops.Int8Weight made from them
(made again when they are replaced; repacked when qweight is changed in place: ops.Int8Weight
keeps its packed copy only while qweight's version counter is unchanged). So:
- model.to(device) moves them; a dtype change (model.to(torch.bfloat16), .half()) reaches the
  bias, never the int8 weight or its float32 scales;
- state_dict() lists `<name>.qweight` and `<name>.weight_scale` instead of `<name>.weight`, and
  load_state_dict() takes them back into a model quantized the same way (strict as usual);
  a float `<name>.weight` for a quantized module is refused with an error naming it: load float
  weights before quantizing, or quantize the model they load into after loading;
- the weight cannot be replaced (`module.weight = ...` raises; new values copied into the
  buffers in place are used from the next call, as torch sees them: through the buffers, not
  through `.data`: fastdiff.ops._packing), and IP-Adapters cannot be set on
  a quantized cross-attention layer (UNet2DCondition.set_ip_adapters raises TypeError naming it):
  set them first, then quantize (their K/V projections are then quantized too).
"""
from __future__ import annotations

import torch
from torch import nn

from fastdiff import ops
from fastdiff.models.layers import SeparableConv2d

DTYPES = ("int8",)


def check_quantize(value, name: str = "quantize"):
    """A `quantize=` argument (loading, accelerate, the CLI): None (float weights) or one of DTYPES;
    anything else raises ValueError naming `name`."""
    if value is not None and (not isinstance(value, str) or value not in DTYPES):
        raise ValueError(f"{name}: expected None or one of {DTYPES}, got {value!r}")
    return value


def is_quantized(model: nn.Module) -> bool:
    """Whether fastdiff.quantize converted any of `model`'s modules."""
    return any(isinstance(m, _Int8Module) for m in model.modules())
EXCLUDE = ("conv_in", "conv_out", "time_embedding", "time_emb_proj", "add_embedding", "class_embedding")


class _Int8Module:
    """The int8 weight as buffers (qweight, weight_scale) and `weight` as their ops.Int8Weight."""

    @property
    def weight(self) -> ops.Int8Weight:
        qweight, scale = self.qweight, self.weight_scale
        cached = self.__dict__.get("_int8_weight")
        # the Int8Weight holds both tensors, so the ids stay theirs while it is cached; it repacks
        # qweight after in-place changes itself (ops.Int8Weight.layout)
        if cached is None or cached[0] != (id(qweight), id(scale)):
            cached = ((id(qweight), id(scale)), ops.Int8Weight(qweight, scale, self._float_weight_shape()))
            self.__dict__["_int8_weight"] = cached
        return cached[1]

    @weight.setter
    def weight(self, value):
        raise AttributeError(f"weight: this {type(self).__name__} is quantized (fastdiff.quantize); its int8 weight "
                             f"cannot be replaced: set float weights before quantizing")

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_scale.device)  # the scales stay float32 whatever the dtype
        self.__dict__.pop("_int8_weight", None)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            error_msgs.append(f"state_dict: {prefix}weight is a float weight, but {prefix[:-1] or 'the module'} is "
                              f"quantized (fastdiff.quantize): load float weights before quantizing (a quantized "
                              f"model's state_dict has {prefix}qweight and {prefix}weight_scale)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.__dict__.pop("_int8_weight", None)  # with assign=True the old buffers would stay held by it


class Int8Linear(_Int8Module, nn.Linear):
    """An nn.Linear whose weight is an ops.Int8Weight; its call goes through ops.linear."""

    def _float_weight_shape(self):
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Int8Conv2d(_Int8Module, nn.Conv2d):
    """An nn.Conv2d (zero padding) whose weight is an ops.Int8Weight; its call goes through ops.conv2d."""

    def _float_weight_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation)


def _convertible(module: nn.Module, conv3x3: bool) -> bool:
    if type(module) in (Int8Linear, Int8Conv2d):
        return False  # already quantized
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
                and (conv3x3 or module.kernel_size == (1, 1)))
    return False


def quantize(model: nn.Module, dtype: str = "int8", *, exclude=EXCLUDE, conv3x3: bool = False) -> list[str]:
    """Quantize `model`'s nn.Linear and 1x1 nn.Conv2d weights in place (see the module docstring).

    dtype: "int8" (W8A8, the only one). exclude: name parts whose modules, and everything under
    them, stay float (default EXCLUDE: conv_in, conv_out and the time / class / added embeddings).
    conv3x3: also the ungrouped convolutions with larger kernels (each output pixel's patch
    quantized as a row: an int8 copy of kh*kw bytes per input value and output pixel per call). Returns the qualified names of the modules quantized, in order.

        names = fastdiff.quantize(pipe.unet)   # pipe.generate(...) then runs its UNet on int8 GEMMs
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str) or not all(isinstance(part, str) for part in exclude):
        raise TypeError(f"exclude: expected a sequence of module name parts (str), got {exclude!r}")
    excluded = set(exclude)
    fused = {id(child) for m in model.modules() if isinstance(m, SeparableConv2d) for child in m.children()}
    done = []
    for name, module in model.named_modules():
        if excluded.intersection(name.split(".")) or id(module) in fused or not _convertible(module, conv3x3):
            continue
        weight = module.weight
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"model: {name}'s weight is {weight.dtype}; expected a float model")
        quantized = ops.quantize_weight(weight.detach().float())
        del module.weight  # the parameter goes; the class's `weight` is the buffers' Int8Weight
        module.__class__ = Int8Linear if isinstance(module, nn.Linear) else Int8Conv2d
        module.register_buffer("qweight", quantized.qweight)
        module.register_buffer("weight_scale", quantized.scale)
        done.append(name)
    return done
