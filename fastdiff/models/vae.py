"""AutoencoderKL: diffusers' KL VAE (Stable Diffusion's, InstructPix2Pix's, MGIE's, MobileDiffusion's
3-channel one) on fastdiff.ops, with diffusers' parameter names.

    encode: image (B, 3, H, W) in [-1, 1] -> conv_in -> down_blocks (resnets, stride-2 conv) -> mid_block
            (resnet, single-head self-attention, resnet) -> GroupNorm+SiLU -> conv_out -> quant_conv
            -> (mean, logvar); returns the mean (the mode), UNSCALED
    decode: latents (B, c, H/f, W/f), UNSCALED -> post_quant_conv -> conv_in -> mid_block -> up_blocks
            (resnets, nearest x2 + conv) -> GroupNorm+SiLU -> conv_out -> image in [-1, 1] (not clamped)

Latent scale: `encode` and `decode` work on the VAE's own latents, as diffusers' `latent_dist.mode()`
and `vae.decode` do. The UNet's text-to-image latent space is `scale_latents(z)` = (z - shift_factor)
* scaling_factor (SD: 0.18215); InstructPix2Pix / MGIE feed the image latents to the UNet unscaled.

GroupNorm (+ fused SiLU), attention and the convolutions (ops.conv2d) go through fastdiff.ops,
on channels_last maps (the layout every block keeps end to end).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.models import checkpoint
from fastdiff.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv2d, from_tokens, group_norm, inference_only, to_tokens
from fastdiff.noise import randn

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "pil_to_tensor", "tensor_to_pil"]

# Diffusers config fields kept for the record only, and fields whose other values are not implemented.
IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers AutoencoderKL's config fields (same names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config) -> "AutoencoderKLConfig":
        """From a diffusers config (model.config or config.json's dict); unknown fields raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(config).items():
            if key in known:
                values[key] = tuple(value) if isinstance(value, list) else value
            elif key not in IGNORED_FIELDS:
                raise ValueError(f"config field {key!r} is unknown to fastdiff.AutoencoderKL")
        return cls(**values)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"config field 'down_block_types'={self.down_block_types!r}: only {n} x 'DownEncoderBlock2D' is supported")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"config field 'up_block_types'={self.up_block_types!r}: only {n} x 'UpDecoderBlock2D' is supported")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"config field 'act_fn'={self.act_fn!r} is not supported (only 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"config field 'norm_num_groups'={self.norm_num_groups} must divide every block_out_channels entry, not {bad}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (SD: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)


class MidBlockAttention(Attention):
    """The VAE mid-block's attention: GroupNorm, one head over all channels, residual.

    diffusers builds it with heads = channels // attention_head_dim = 1, so the head dim is the
    channel count: SD's 512 is past the kernels' ops.FAST_HEAD_DIMS, where ops.attention would run
    its reference twin, which forms the (HW, HW) score matrix (1 GiB at 1024 px). Those layers run
    torch's scaled_dot_product_attention instead, which does not (the only non-ops attention in
    fastdiff's models).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = to_tokens(group_norm(x, self.group_norm))  # (B, H*W, C), a view of channels_last x
        q, k, v = (ops.linear(tokens, proj.weight, proj.bias).view(B, H * W, 1, C) for proj in (self.to_q, self.to_k, self.to_v))
        if C <= ops.FAST_HEAD_DIMS[1]:
            out = ops.attention(q, k, v, scale=self.scale)  # (B, HW, 1, C)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)
        to_out = self.to_out[0]
        out = ops.linear(out.reshape(B, H * W, C), to_out.weight, to_out.bias, residual=to_tokens(x))  # x added by the GEMM
        return from_tokens(out, H, W)  # (B, C, H, W) channels_last


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without time embedding: resnets[0], then (attentions[i], resnets[i+1])."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidBlockAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups)
            for i in range(num_layers)
        ])
        # padding=0: pad right/bottom by one, then a stride-2 3x3 conv (diffusers' VAE downsampler)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], c, cfg.layers_per_block, groups, add_downsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ])
        self.mid_block = MidBlock(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv2d(self.conv_in, x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return conv2d(self.conv_out, group_norm(x, self.conv_norm_out, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        channels, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(channels[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, add_upsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(conv2d(self.conv_in, z))
        for block in self.up_blocks:
            x = block(x)
        return conv2d(self.conv_out, group_norm(x, self.conv_norm_out, silu=True))


def _rename_deprecated_attention(state_dict: dict) -> dict:
    """Old VAE checkpoints (e.g. SD1.x .bin files) name the mid-block attention query/key/value/
    proj_attn; diffusers renames them on load to to_q/to_k/to_v/to_out.0, and so do we."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for name, value in state_dict.items():
        head, _, leaf = name.rpartition(".")  # e.g. "encoder.mid_block.attentions.0.query", "weight"
        path, _, module = head.rpartition(".")
        if ".mid_block.attentions." in name and module in renames:
            name = f"{path}.{renames[module]}.{leaf}"
        out[name] = value
    return out


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL for inference: `encode` (image -> latent mode) and `decode`."""

    def __init__(self, config: AutoencoderKLConfig | None = None, **fields):
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig(**fields)
        elif fields:
            raise TypeError("AutoencoderKL: pass a config or config fields, not both")
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if config.use_post_quant_conv else None
        self.to(memory_format=torch.channels_last)  # conv weights in the activations' layout: no reorder per call

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, model_or_folder, dtype: torch.dtype | None = None, device=None) -> "AutoencoderKL":
        """From an in-memory diffusers AutoencoderKL, or a folder: a diffusers model folder
        (config.json + diffusion_pytorch_model.safetensors/.bin) or a pipeline folder with it in
        vae/. Reading a folder does not import diffusers. dtype defaults to float32."""
        if isinstance(model_or_folder, (str, os.PathLike)):
            config, state_dict = checkpoint.read_model_folder(model_or_folder, subfolder="vae")
            copy = False  # fresh tensors from the file
        elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
            config, state_dict = dict(model_or_folder.config), model_or_folder.state_dict()
            copy = True  # never share storage with the source model
        else:
            raise TypeError(f"model_or_folder: expected a diffusers AutoencoderKL or a folder path, got {type(model_or_folder).__name__}")
        with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
            model = cls(AutoencoderKLConfig.from_diffusers(config))
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.load_state_dict({k: v.to(device=device, dtype=dtype or torch.float32, copy=copy) for k, v in state_dict.items()}, assign=True)
        return model.to(memory_format=torch.channels_last).eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict that also takes old attention names and wrapped/prefixed
        state_dicts, and raises checkpoint.CheckpointError listing every missing/unexpected key."""
        state_dict = checkpoint.match_state_dict(_rename_deprecated_attention(dict(state_dict)), self.state_dict(),
                                                 strict=strict, owner="AutoencoderKL")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    # -- inference -------------------------------------------------------------------------------

    def _check(self, name: str, x: torch.Tensor, channels: int):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected a (batch, {channels}, height, width) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"{name}: expected {self.dtype} on {self.device} (the VAE's), got {x.dtype} on {x.device}")

    @inference_only
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the latent Gaussian, each (B, latent_channels, H/f, W/f), unscaled."""
        self._check("images", images, self.config.in_channels)
        moments = self.encoder(images.contiguous(memory_format=torch.channels_last))
        if self.quant_conv is not None:
            moments = conv2d(self.quant_conv, moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(-30.0, 20.0).contiguous()

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        """images (B, in_channels, H, W) in [-1, 1] -> UNSCALED latents (B, latent_channels, H/f, W/f):
        the mode (diffusers' latent_dist.mode()), or with sample=True mean + std * noise drawn
        from `generator` as diffusers' latent_dist.sample(generator)."""
        mean, logvar = self.encode_moments(images)
        if not sample:
            return mean
        return mean + torch.exp(0.5 * logvar) * randn(mean.shape, generator, mean.device, mean.dtype)

    @inference_only
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNSCALED latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f), nominally
        in [-1, 1] (not clamped, as diffusers' vae.decode)."""
        self._check("latents", latents, self.config.latent_channels)
        z = latents.contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            z = conv2d(self.post_quant_conv, z)
        return self.decoder(z).contiguous()

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's latent space: (z - shift_factor) * scaling_factor."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> VAE latents for `decode`."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)


def pil_to_tensor(images) -> torch.Tensor:
    """PIL image(s) of one size -> (B, 3, H, W) float32 in [-1, 1] (RGB; [0, 255] -> [-1, 1], as
    diffusers' VaeImageProcessor without resizing)."""
    from PIL import Image

    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise TypeError("images: expected a PIL image or a non-empty list of PIL images")
    if len({im.size for im in images}) != 1:
        raise ValueError(f"images: expected one size for the batch, got {sorted({im.size for im in images})}")
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def tensor_to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images (clamped, [-1, 1] -> [0, 255], rounded as diffusers)."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (batch, 3, height, width) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    array = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
