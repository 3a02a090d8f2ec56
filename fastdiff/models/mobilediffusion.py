"""MobileDiffusion's UNet (Zhao et al., "MobileDiffusion: Instant Text-to-Image Generation on
Mobile Devices", 2023/2024), built from fastdiff.models.layers (which call fastdiff.ops).

Compared with SD1.5's UNet (860M parameters, 339 G MACs at 512x512), each change is a config
field so that it can be reverted (`python -m fastdiff.bench ablations` does, one at a time):

  * three resolution levels (64/32/16 for a 64x64 latent) with a 16x16 core holding most of the
    transformer depth (UViT-like); no transformer blocks at 64x64       -> transformer_depth
  * transformer blocks without self-attention (cross-attention only) outside the core
                                                                         -> cross_attention_only
  * one projection for keys and values (W_k = W_v): `to_kv`, ops.attention(q, kv, v=None)
                                                                         -> shared_kv
  * SwiGLU feed-forward with expansion 6: the GLU projection outputs 6*dim, a*silu(gate) keeps
    3*dim, the output projection maps 3*dim -> dim (SD's GEGLU: 8*dim -> 4*dim -> dim)
                                                                         -> ff_expansion, ff_activation
  * optional ReLU attention, relu(q kᵀ / sqrt(d)) v / L_k (off by default) -> relu_attention
  * depthwise-separable 3x3 convs in the residual blocks below 64x64      -> separable_conv
  * 12 residual blocks instead of 22: one per level on each side, six in the core
                                                                         -> down_layers, up_layers, mid_layers
  * a 3-channel latent (MobileDiffusion's VAE) instead of SD's 4          -> in_channels, out_channels

Layout: down level i runs down_layers[i] x (ResnetBlock2D [+ Transformer2DModel]) and keeps each
output as a skip; then a stride-2 conv. The core is resnets[0], then (attentions[k], resnets[k+1]).
Up level i (coarse to fine) runs up_layers[i] x (ResnetBlock2D [+ Transformer2DModel]), the first
down_layers[i] of them on [x, skip] concatenated, then nearest-x2 + conv. Activations are
channels_last throughout; attention sees (B, L, heads, head_dim) views of the projections.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from .flops import CATEGORIES, count_macs, count_params
from .layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Transformer2DModel,
    Conv2d,
    Upsample2D,
    group_norm,
    inference_only,
)
from .unet_common import ConditionalUNet, DeepCacheRows

__all__ = ["MobileDiffusionConfig", "MobileDiffusionUNet", "PRESETS", "ModelSummary"]


@dataclass(frozen=True)
class MobileDiffusionConfig:
    """Architecture of a MobileDiffusion UNet. Per-level tuples run from the finest level (64x64
    for a 512x512 image) to the coarsest, which is also the core's resolution."""

    sample_size: int = 64  # latent side: 512 px / 8 (VAE downsampling)
    in_channels: int = 3  # MobileDiffusion's VAE latent has 3 channels (SD: 4)
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (320, 640, 1024)
    down_layers: tuple[int, ...] = (1, 1, 1)  # residual blocks per down level
    up_layers: tuple[int, ...] = (1, 1, 1)  # residual blocks per up level (>= down_layers: skips pair up)
    transformer_depth: tuple[int, ...] = (0, 2, 1)  # transformer blocks after each residual block; 0: none
    cross_attention_only: tuple[bool, ...] = (True, True, True)  # per level: blocks without self-attention
    separable_conv: tuple[bool, ...] = (False, True, True)  # per level; the core uses the last entry
    mid_layers: int = 6  # residual blocks in the core
    mid_transformer_depth: int = 17  # full (self + cross) transformer blocks in the core, over its mid_layers-1 gaps
    attention_head_dim: int = 64
    cross_attention_dim: int = 768  # CLIP ViT-L/14 text features
    text_length: int = 77  # tokens of text context (for summary())
    shared_kv: bool = True
    ff_expansion: int = 6  # GLU projection width / dim (SD's GEGLU: 8)
    ff_activation: str = "silu"  # SwiGLU (SD: "gelu")
    relu_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if levels < 1 or any(not isinstance(c, int) or c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels: expected positive ints, got {self.block_out_channels!r}")
        for name in ("down_layers", "up_layers", "transformer_depth", "cross_attention_only", "separable_conv"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != levels:
                raise ValueError(f"{name}: expected a tuple with one entry per level ({levels}), got {value!r}")
        for i, (down, up) in enumerate(zip(self.down_layers, self.up_layers)):
            if down < 1 or up < down:
                raise ValueError(f"down_layers/up_layers: level {i} needs 1 <= down <= up (skips pair up), got {down}, {up}")
        if any(d < 0 for d in self.transformer_depth) or self.mid_transformer_depth < 0:
            raise ValueError("transformer_depth, mid_transformer_depth: expected counts >= 0")
        if self.mid_layers < 1 or (self.mid_layers == 1 and self.mid_transformer_depth):
            raise ValueError(f"mid_transformer_depth: the core's transformer blocks sit between its residual blocks, so "
                             f"they need mid_layers >= 2, got mid_layers={self.mid_layers}")
        if not isinstance(self.attention_head_dim, int) or self.attention_head_dim < 1:
            raise ValueError(f"attention_head_dim: expected a positive int, got {self.attention_head_dim!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_head_dim:
                raise ValueError(f"block_out_channels: {c} must be a multiple of norm_num_groups "
                                 f"({self.norm_num_groups}) and attention_head_dim ({self.attention_head_dim})")
        if self.ff_expansion < 2 or self.ff_expansion % 2:
            raise ValueError(f"ff_expansion: expected an even int >= 2 (GLU halves it), got {self.ff_expansion}")
        if self.ff_activation not in ("silu", "gelu"):
            raise ValueError(f"ff_activation: expected 'silu' or 'gelu', got {self.ff_activation!r}")
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size: must be divisible by {2 ** (levels - 1)} for {levels} levels, got {self.sample_size}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_resnets(self) -> int:
        return sum(self.down_layers) + sum(self.up_layers) + self.mid_layers

    def mid_depths(self) -> list[int]:
        """The core's transformer blocks spread over its mid_layers-1 gaps, deeper ones first
        (gaps past mid_transformer_depth stay empty)."""
        gaps = self.mid_layers - 1
        base, extra = divmod(self.mid_transformer_depth, gaps) if gaps else (0, 0)
        return [base + (k < extra) for k in range(gaps)]

    def replace(self, **changes) -> "MobileDiffusionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **changes) -> "MobileDiffusionConfig":
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name].replace(**changes)


PRESETS = {
    # The paper's model: 320/640/1024 channels, 12 residual blocks. The transformer depth is tuned
    # to the paper's size: 2 cross-only blocks per 32x32 transformer, 1 per outer 16x16 one, 17
    # full blocks in the core (4, 4, 3, 3, 3 over its five gaps) -> 386.6M parameters (paper:
    # 386M) and 154 G MACs at 512x512 (conv + linear; 158 G with the attention matmuls), against
    # SD1.5's 860M / 339 G. Each core block is ~15.5M parameters and ~4 G MACs at 16x16, so one
    # block more or less moves the size by 4%.
    "mobilediffusion": MobileDiffusionConfig(),
    # For tests: every feature on (transformers at two levels, a core, separable and dense convs),
    # 0.54M parameters, a forward pass in milliseconds.
    "tiny": MobileDiffusionConfig(
        sample_size=16, block_out_channels=(32, 48, 64), transformer_depth=(0, 1, 1), mid_layers=2,
        mid_transformer_depth=1, attention_head_dim=16, cross_attention_dim=32, text_length=7, norm_num_groups=8,
    ),
    # The trained default (fastdiff.train, on fastdiff.toyworld's 128x128 scenes: 16x16x3 latents):
    # the paper's layout at a size that trains on two CPU cores: no transformer at the finest level,
    # cross-attention-only blocks at 8x8 and around the 4x4 core, full ones inside it.
    "toyworld": MobileDiffusionConfig(
        sample_size=16, block_out_channels=(48, 96, 144), transformer_depth=(0, 1, 1), mid_layers=3,
        mid_transformer_depth=2, attention_head_dim=24, cross_attention_dim=128, text_length=32, norm_num_groups=16,
    ),
}


# ----------------------------------------------------------------------------------------------
# blocks


def _transformer(config: MobileDiffusionConfig, channels: int, depth: int, self_attention: bool) -> Transformer2DModel:
    return Transformer2DModel(
        channels // config.attention_head_dim, config.attention_head_dim, channels, num_layers=depth,
        cross_attention_dim=config.cross_attention_dim, norm_num_groups=config.norm_num_groups,
        use_linear_projection=True, self_attention=self_attention, norm_eps=config.norm_eps,
        ff_mult=config.ff_expansion / 2, ff_activation=config.ff_activation,
        shared_kv=config.shared_kv, kind="relu" if config.relu_attention else "softmax",
    )


def _resnet(config: MobileDiffusionConfig, in_channels: int, out_channels: int, separable: bool) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, temb_channels=config.time_embed_dim, groups=config.norm_num_groups,
                         eps=config.norm_eps, separable=separable)


class DownBlock(nn.Module):
    """resnets[j] (+ attentions[j]) per layer, each output kept as a skip; then downsamplers.0."""

    def __init__(self, config: MobileDiffusionConfig, level: int, in_channels: int):
        super().__init__()
        channels = config.block_out_channels[level]
        depth = config.transformer_depth[level]
        separable = config.separable_conv[level]
        self.resnets = nn.ModuleList([
            _resnet(config, in_channels if j == 0 else channels, channels, separable) for j in range(config.down_layers[level])
        ])
        self.attentions = nn.ModuleList([
            _transformer(config, channels, depth, not config.cross_attention_only[level]) for _ in self.resnets
        ]) if depth else None
        last = level == len(config.block_out_channels) - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(channels)])

    def forward(self, x, temb, context, skips: list, deeper: int | None = None):
        """deeper: how many of the first rows go on to the next level (default all), so are downsampled."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x[:deeper]) if deeper != 0 else None  # (deeper, C, H/2, W/2)
        return x


class MidBlock(nn.Module):
    """The core: resnets[0], then (attentions[k], resnets[k+1]); full transformer blocks."""

    def __init__(self, config: MobileDiffusionConfig):
        super().__init__()
        channels = config.block_out_channels[-1]
        separable = config.separable_conv[-1]
        self.resnets = nn.ModuleList([_resnet(config, channels, channels, separable) for _ in range(config.mid_layers)])
        self.attentions = nn.ModuleList([_transformer(config, channels, depth, True) for depth in config.mid_depths() if depth])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for k, resnet in enumerate(self.resnets[1:]):
            if k < len(self.attentions):
                x = self.attentions[k](x, context)
            x = resnet(x, temb)
        return x


class UpBlock(nn.Module):
    """resnets[j] on [x, skip] (+ attentions[j]) per layer; then upsamplers.0 unless finest."""

    def __init__(self, config: MobileDiffusionConfig, level: int, in_channels: int):
        super().__init__()
        channels = config.block_out_channels[level]
        depth = config.transformer_depth[level]
        separable = config.separable_conv[level]
        self.num_skips = config.down_layers[level]
        self.resnets = nn.ModuleList([
            _resnet(config, (in_channels if j == 0 else channels) + (channels if j < self.num_skips else 0), channels, separable)
            for j in range(config.up_layers[level])
        ])
        self.attentions = nn.ModuleList([
            _transformer(config, channels, depth, not config.cross_attention_only[level]) for _ in self.resnets
        ]) if depth else None
        self.upsamplers = nn.ModuleList([Upsample2D(channels)]) if level > 0 else None

    def forward(self, x, temb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            if j < self.num_skips:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C_in + C_skip, H, W), channels_last
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, output_size=skips[-1].shape[2:])  # the next skip's size: 2H x 2W, less where odd
        return x


# ----------------------------------------------------------------------------------------------
# the UNet


class MobileDiffusionUNet(ConditionalUNet):
    """unet(sample, timestep, encoder_hidden_states) -> predicted noise (B, out_channels, H, W),
    channels_last, in the model's dtype (fp32 or bf16: model.to(torch.bfloat16)).

    sample: (B, in_channels, H, W), any H, W (odd maps are upsampled back to their skip's size);
    timestep: a number, a 1-element tensor or a (B,) tensor; encoder_hidden_states: (B, L,
    cross_attention_dim); the full rule is ConditionalUNet's. Inference only: forward runs under
    torch.no_grad() unless `trainable` is set (layers.inference_only).
    """

    def __init__(self, config: MobileDiffusionConfig | None = None):
        super().__init__()
        config = config or MobileDiffusionConfig()
        if not isinstance(config, MobileDiffusionConfig):
            raise TypeError(f"config: expected a MobileDiffusionConfig, got {type(config).__name__}")
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)

        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(config, i, channels[max(i - 1, 0)]) for i in range(levels)
        ])
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList([  # diffusers order: coarsest first
            UpBlock(config, i, channels[min(i + 1, levels - 1)]) for i in reversed(range(levels))
        ])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_preset(cls, name: str, **changes) -> "MobileDiffusionUNet":
        return cls(MobileDiffusionConfig.from_preset(name, **changes))

    @property
    def cross_attention_dim(self) -> int:
        return self.config.cross_attention_dim

    @property
    def num_levels(self) -> int:
        return len(self.config.block_out_channels)

    @property
    def max_cache_depth(self) -> int:
        return self.num_levels  # the core always remains to cache (and holds most of the transformer depth)

    @inference_only
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                cache: DeepCacheRows | None = None) -> torch.Tensor:
        """cache: DeepCache per row (see DeepCacheRows): rows that reuse their deep features run only
        their outer levels, rows that refresh them leave them in cache.stored."""
        x, timesteps, context = self._check_inputs(sample, timestep, encoder_hidden_states)  # x channels_last

        # time embedding: sinusoid in fp32, then the MLP in the model's dtype
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))  # (B, 4*C0)
        # conv_in; down (each level's outputs become skips, a stride-2 conv between levels); the core
        # (residual blocks with full transformers between them); up (the skips of the same level
        # concatenated, coarse to fine); out (GroupNorm + SiLU, 3x3 conv to the latent channels)
        return self._run_levels(x, temb, context, cache)  # (B, out_channels, H, W)

    def _stem(self, x, skips):
        return self.conv_in(x)  # (B, C0, H, W), through ops.conv2d; not a skip here

    def _down(self, level, x, temb, context, skips, deeper):
        return self.down_blocks[level](x, temb, context, skips, deeper)  # (deeper, C_i+1, H/2^(i+1), ...)

    def _mid(self, x, temb, context):
        return self.mid_block(x, temb, context)

    def _up(self, level, x, temb, context, skips):
        return self.up_blocks[self.num_levels - 1 - level](x, temb, context, skips)  # up_blocks: coarsest first

    def _head(self, x):
        return self.conv_out(group_norm(x, self.conv_norm_out, silu=True))

    def summary(self, *, batch_size: int = 1, print_table: bool = True) -> "ModelSummary":
        """Parameters and MACs of one forward pass at the config's resolution (sample_size, with
        text_length tokens), total and per block; counted on a meta-device twin (no compute)."""
        return summarize(self.config, batch_size=batch_size, print_table=print_table)


# ----------------------------------------------------------------------------------------------
# summary


@dataclass
class ModelSummary:
    params: int
    macs: dict[str, int]  # by category (flops.CATEGORIES), whole forward pass
    rows: list[tuple[str, str, int, int]]  # (block, input resolution, params, MACs incl. attention);
    # an up block's upsampler conv runs at twice its input resolution
    resolution: int  # latent side
    batch_size: int = 1

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    @property
    def module_macs(self) -> int:
        """conv + linear (the convention of published UNet figures)."""
        return self.total_macs - self.macs["attention"]

    def table(self) -> str:
        lines = [f"{'block':<16}{'res':>8}{'params (M)':>12}{'GMACs':>9}"]
        for name, res, params, macs in self.rows:
            lines.append(f"{name:<16}{res:>8}{params / 1e6:>12.2f}{macs / 1e9:>9.2f}")
        lines.append(f"{'total':<16}{'':>8}{self.params / 1e6:>12.2f}{self.total_macs / 1e9:>9.2f}")
        by_kind = ", ".join(f"{k} {self.macs[k] / 1e9:.2f}" for k in CATEGORIES)
        lines.append(f"GMACs by kind: {by_kind}; conv + linear {self.module_macs / 1e9:.2f} "
                     f"(latent {self.resolution}x{self.resolution} = {8 * self.resolution}px, batch {self.batch_size})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def build_meta(config: MobileDiffusionConfig, batch_size: int = 1):
    """(model, inputs) on the meta device: shapes only, no memory, for counting."""
    with torch.device("meta"):
        model = MobileDiffusionUNet(config)
        sample = torch.empty(batch_size, config.in_channels, config.sample_size, config.sample_size)
        context = torch.empty(batch_size, config.text_length, config.cross_attention_dim)
    return model, (sample, torch.zeros(batch_size, device="meta"), context)


def summarize(config: MobileDiffusionConfig, *, batch_size: int = 1, print_table: bool = False) -> ModelSummary:
    model, inputs = build_meta(config, batch_size)
    count = count_macs(model, *inputs)
    levels = len(config.block_out_channels)
    side = lambda level: f"{config.sample_size >> level}x{config.sample_size >> level}"  # noqa: E731
    blocks = [("time_embedding", "-"), ("conv_in", side(0))]
    blocks += [(f"down_blocks.{i}", side(i)) for i in range(levels)]
    blocks += [("mid_block", side(levels - 1))]
    blocks += [(f"up_blocks.{k}", side(levels - 1 - k)) for k in range(levels)]
    blocks += [("conv_out", side(0))]
    modules = dict(model.named_modules())
    rows = [(name, res, count_params(modules[name]), sum(count.module(name).values())) for name, res in blocks]
    rows.append(("conv_norm_out", side(0), count_params(model.conv_norm_out), 0))
    summary = ModelSummary(params=count.params, macs=count.macs, rows=rows, resolution=config.sample_size,
                           batch_size=batch_size)
    if print_table:
        print(summary.table())
    return summary
