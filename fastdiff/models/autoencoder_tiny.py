"""AutoencoderTiny: TAESD (a tiny distilled encoder/decoder, madebyollin's), in diffusers'
AutoencoderTiny layout and parameter names, on fastdiff's dense products.

    block(x)  = relu(conv3(relu(conv2(relu(conv1(x))))) + x)      3x3 convs, one width throughout
    encode:     image in [-1, 1] -> [0, 1] -> conv -> blocks -> (stride-2 conv -> blocks) x (n-1) -> conv
                -> latents (B, latent_channels, ceil(H/f), ceil(W/f))
    decode:     latents -> 3 * tanh(z / 3) -> conv, relu -> (blocks, nearest x2, conv) x (n-1) -> blocks
                -> conv -> [0, 1] -> image in [-1, 1] (not clamped)

Latent convention. TAESD is distilled to reproduce the KL VAE's latents *already scaled* into the
diffusion model's space (diffusers' config says scaling_factor 1.0). fastdiff's VAEs share one
interface (Pipeline relies on it): `encode` returns the VAE's own latents, `scale_latents` maps
them into the UNet's space and `unscale_latents` maps the UNet's latents back for `decode`. Here
those two apply config.scaling_factor / shift_factor, which TAESD's files leave at 1.0 / 0.0, so
they are the identity and encode/decode are exactly diffusers' encode(x).latents / decode(z).sample.
diffusers' own AutoencoderTiny.scale_latents/unscale_latents are something else (latents <-> [0, 1]
for 8-bit storage, via latent_magnitude/latent_shift); those fields are kept for the record only.
InstructPix2Pix-style editors take the KL VAE's *unscaled* image latents, which a TAESD does not
produce, so fastdiff.loading refuses a tiny VAE for an editor UNet.

All convolutions go through fastdiff.ops.conv2d (oneDNN on the CPU, weights packed once; the block's
residual add is fused into its last convolution).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.models import checkpoint
from fastdiff.models.layers import conv2d

__all__ = ["AutoencoderTiny", "AutoencoderTinyConfig"]

# diffusers config fields kept for the record only (latent_magnitude/latent_shift: see the module docstring).
IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "force_upcast",
                  "block_out_channels"}  # diffusers registers block_out_channels = decoder_block_out_channels


@dataclasses.dataclass(frozen=True)
class AutoencoderTinyConfig:
    """diffusers AutoencoderTiny's config fields (same names and defaults: TAESD's)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @classmethod
    def from_diffusers(cls, config) -> "AutoencoderTinyConfig":
        """From a diffusers config (model.config or config.json's dict); unknown fields raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(config).items():
            if key in known:
                values[key] = tuple(value) if isinstance(value, list) else value
            elif key not in IGNORED_FIELDS:
                raise ValueError(f"config field {key!r} is unknown to fastdiff.AutoencoderTiny")
        return cls(**values)

    def __post_init__(self):
        if self.act_fn != "relu":
            raise ValueError(f"config field 'act_fn'={self.act_fn!r} is not supported (only TAESD's 'relu')")
        if self.upsample_fn != "nearest":
            raise ValueError(f"config field 'upsample_fn'={self.upsample_fn!r} is not supported (only 'nearest')")
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(blocks):
                raise ValueError(f"config fields '{side}_block_out_channels' and 'num_{side}_blocks' differ in length "
                                 f"({len(widths)} vs {len(blocks)})")
            # diffusers builds the convs between stages c_i -> c_i: only one width runs
            if len(set(widths)) != 1:
                raise ValueError(f"config field '{side}_block_out_channels'={widths!r}: only one width is supported "
                                 f"(the convolutions between stages keep the width)")
        if 2 ** (len(self.num_encoder_blocks) - 1) != self.downscale:
            raise ValueError(f"the encoder downscales by {2 ** (len(self.num_encoder_blocks) - 1)} but the decoder "
                             f"upscales by {self.downscale}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (TAESD: 8)."""
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)


def _conv3x3(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride, bias=bias)


class TinyBlock(nn.Module):
    """diffusers' AutoencoderTinyBlock at one width (its identity skip): conv.{0,2,4} are the 3x3
    convs, 1 and 3 hold the ReLUs (no parameters)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(width, width), nn.ReLU(), _conv3x3(width, width), nn.ReLU(), _conv3x3(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu_(conv2d(self.conv[0], x))
        h = F.relu_(conv2d(self.conv[2], h))
        return F.relu_(conv2d(self.conv[4], h, residual=x))  # the skip add fused into the conv


def _run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layer list in order, convolutions through ops.conv2d (diffusers' Sequential indices are kept
    for the parameter names, so ReLU/Upsample entries stand in their places)."""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            x = conv2d(layer, x)
        elif isinstance(layer, nn.ReLU):
            x = F.relu_(x)
        elif isinstance(layer, nn.Upsample):
            x = F.interpolate(x, scale_factor=layer.scale_factor, mode="nearest")
        else:
            x = layer(x)
    return x


class EncoderTiny(nn.Module):
    def __init__(self, cfg: AutoencoderTinyConfig):
        super().__init__()
        layers = []
        for i, (width, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            layers.append(_conv3x3(cfg.in_channels, width) if i == 0 else _conv3x3(width, width, stride=2, bias=False))
            layers += [TinyBlock(width) for _ in range(blocks)]
        layers.append(_conv3x3(cfg.encoder_block_out_channels[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _run_layers(self.layers, images * 0.5 + 0.5)  # TAESD's images are in [0, 1]


class DecoderTiny(nn.Module):
    def __init__(self, cfg: AutoencoderTinyConfig):
        super().__init__()
        widths = cfg.decoder_block_out_channels
        layers = [_conv3x3(cfg.latent_channels, widths[0]), nn.ReLU()]
        for i, (width, blocks) in enumerate(zip(widths, cfg.num_decoder_blocks)):
            last = i == len(widths) - 1
            layers += [TinyBlock(width) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode="nearest"))
            layers.append(_conv3x3(width, cfg.out_channels if last else width, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # TAESD's soft clamp of the latents to (-3, 3)
        return _run_layers(self.layers, x) * 2 - 1  # [0, 1] -> [-1, 1]


class AutoencoderTiny(nn.Module):
    """diffusers' AutoencoderTiny (TAESD) for inference, with AutoencoderKL's interface (see the
    module docstring for the latent convention)."""

    def __init__(self, config: AutoencoderTinyConfig | None = None, **fields):
        super().__init__()
        if config is None:
            config = AutoencoderTinyConfig(**fields)
        elif fields:
            raise TypeError("AutoencoderTiny: pass a config or config fields, not both")
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)
        self.to(memory_format=torch.channels_last)  # conv weights in the activations' layout

    @classmethod
    def from_diffusers(cls, model_or_folder, dtype: torch.dtype | None = None, device=None) -> "AutoencoderTiny":
        """From an in-memory diffusers AutoencoderTiny, or a folder: a diffusers model folder
        (config.json + diffusion_pytorch_model.safetensors/.bin) or a pipeline folder with it in
        vae/. Reading a folder does not import diffusers. dtype defaults to float32."""
        if isinstance(model_or_folder, (str, os.PathLike)):
            config, state_dict = checkpoint.read_model_folder(model_or_folder, subfolder="vae")
            copy = False
        elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
            config, state_dict = dict(model_or_folder.config), model_or_folder.state_dict()
            copy = True  # never share storage with the source model
        else:
            raise TypeError(f"model_or_folder: expected a diffusers AutoencoderTiny or a folder path, got {type(model_or_folder).__name__}")
        if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ValueError(f"config: '_class_name' is {config['_class_name']!r}, not 'AutoencoderTiny'")
        with torch.device("meta"):  # every parameter comes from the checkpoint
            model = cls(AutoencoderTinyConfig.from_diffusers(config))
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.load_state_dict({k: v.to(device=device, dtype=dtype or torch.float32, copy=copy) for k, v in state_dict.items()},
                              assign=True)
        return model.to(memory_format=torch.channels_last).eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict that takes wrapped/prefixed state_dicts and raises
        checkpoint.CheckpointError listing every missing/unexpected key."""
        state_dict = checkpoint.match_state_dict(dict(state_dict), self.state_dict(), strict=strict, owner="AutoencoderTiny")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.layers[0].weight.device

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def _check(self, name: str, x: torch.Tensor, channels: int):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected a (batch, {channels}, height, width) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"{name}: expected {self.dtype} on {self.device} (the VAE's), got {x.dtype} on {x.device}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_channels, H, W) in [-1, 1] -> latents (B, latent_channels, ceil(H/f), ceil(W/f)),
        diffusers' encode(images).latents (deterministic: TAESD has no latent distribution)."""
        self._check("images", images, self.config.in_channels)
        return self.encoder(images.contiguous(memory_format=torch.channels_last)).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f), nominally in
        [-1, 1] (not clamped, as diffusers' decode(latents).sample)."""
        self._check("latents", latents, self.config.latent_channels)
        return self.decoder(latents.contiguous(memory_format=torch.channels_last)).contiguous()

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's space: (z - shift_factor) * scaling_factor (TAESD: identity)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> VAE latents for `decode` (TAESD: identity)."""
        return latents / self.config.scaling_factor + self.config.shift_factor
