"""Building blocks shared by fastdiff's UNets and VAE, named like diffusers' modules so that
diffusers state_dicts load without converters.

Parameters live in ordinary nn.Conv2d / nn.Linear / nn.GroupNorm / nn.LayerNorm modules (for
their names and shapes); everything runs through fastdiff.ops: the dense products (ops.linear,
ops.conv2d: oneDNN with weights packed once on the CPU, residual adds fused into the GEMM /
convolution), GroupNorm (+ fused SiLU), attention, GEGLU / SwiGLU, separable convolutions. No
module here imports a kernel.

Layout conventions:
  * feature maps are (B, C, H, W) tensors in channels_last memory, i.e. (B, H, W, C) in memory;
  * a channels_last map is a (B, H*W, C) token sequence without a copy (`to_tokens` / `from_tokens`);
  * attention takes (B, L, heads, head_dim) views of the projection outputs (no permutes).

Variants are built by constructor arguments (MobileDiffusion: shared K/V projection, ReLU
attention, blocks without self-attention, SwiGLU with expansion 6, separable convs in resnets).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops

__all__ = [
    "inference_only",
    "to_tokens",
    "from_tokens",
    "group_norm",
    "conv2d",
    "Conv2d",
    "Timesteps",
    "TimestepEmbedding",
    "SeparableConv2d",
    "ResnetBlock2D",
    "Attention",
    "GLUProjection",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2DModel",
    "Downsample2D",
    "Upsample2D",
]


def inference_only(method):
    """Run a model's method under torch.no_grad(): fastdiff's models are for inference, unless the
    model's `trainable` attribute is set (fastdiff.train sets it to train them with autograd)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(self, "trainable", False)):
            return method(self, *args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------
# layout helpers


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when x is channels_last, a copy otherwise."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def from_tokens(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) contiguous -> (B, C, H, W) channels_last view (no copy)."""
    B, L, C = t.shape
    return t.view(B, height, width, C).permute(0, 3, 1, 2)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, *, silu: bool = False) -> torch.Tensor:
    """Run nn.GroupNorm `norm`'s parameters through ops.group_norm (SiLU fused when silu=True)."""
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


def conv2d(conv: nn.Module, x: torch.Tensor, *, residual: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) [+ residual]: an nn.Conv2d's parameters through ops.conv2d (residual fused; `bias`
    replaces conv.bias, e.g. with a time embedding folded in), another module (SeparableConv2d) as called."""
    if isinstance(conv, nn.Conv2d):
        return ops.conv2d(x, conv.weight, conv.bias if bias is None else bias, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, groups=conv.groups, residual=residual)
    if bias is not None:
        raise TypeError(f"bias: only an nn.Conv2d's bias can be replaced, got a {type(conv).__name__}")
    out = conv(x)
    return out if residual is None else out + residual


class Conv2d(nn.Conv2d):
    """An nn.Conv2d whose call runs through ops.conv2d: for a layer called as a module, so that
    module hooks (the MAC counter's per-block rows) see it under its name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self, x)


# ----------------------------------------------------------------------------------------------
# timestep embedding


class Timesteps(nn.Module):
    """Sinusoidal timestep features (DDPM), as diffusers' get_timestep_embedding.

    (B,) timesteps -> (B, num_channels) float32: [cos, sin] if flip_sin_to_cos else [sin, cos],
    frequencies exp(-ln(max_period) * i / (half - downscale_freq_shift)), i < half.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                 scale: float = 1.0, max_period: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale
        self.max_period = max_period

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))  # (half,)
        args = self.scale * (timesteps[:, None].float() * freqs[None, :])  # (B, half)
        first, second = (torch.cos(args), torch.sin(args)) if self.flip_sin_to_cos else (torch.sin(args), torch.cos(args))
        emb = torch.cat([first, second], dim=-1)  # (B, 2*half)
        if self.num_channels % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: (B, in_channels) -> (B, out_dim or time_embed_dim).

    cond_proj_dim (LCM's guidance embedding, diffusers' `cond_proj`): a bias-free linear of the
    condition (B, cond_proj_dim) is added to the sample before linear_1.
    """

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + ops.linear(condition, self.cond_proj.weight)
        hidden = F.silu(ops.linear(sample, self.linear_1.weight, self.linear_1.bias))
        return ops.linear(hidden, self.linear_2.weight, self.linear_2.bias)


# ----------------------------------------------------------------------------------------------
# convolutions and resnets


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (`depthwise`) then pointwise 1x1 (`pointwise`), fused in ops.separable_conv2d."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw, pw = self.depthwise, self.pointwise
        return ops.separable_conv2d(x, dw.weight, dw.bias, pw.weight, pw.bias)


def conv3x3(in_channels: int, out_channels: int, *, separable: bool = False) -> nn.Module:
    """3x3 'same' convolution: dense nn.Conv2d or SeparableConv2d."""
    if separable:
        return SeparableConv2d(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (pre-norm, time_embedding_norm="default"):

        h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(norm2(h)))
        out = (shortcut(x) + h) / output_scale_factor

    temb_channels=None builds no time_emb_proj (the VAE's resnets). separable=True makes conv1
    and conv2 SeparableConv2d (MobileDiffusion).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, output_scale_factor: float = 1.0,
                 conv_shortcut_bias: bool = True, separable: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = conv3x3(in_channels, out_channels, separable=separable)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.conv2 = conv3x3(out_channels, out_channels, separable=separable)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=conv_shortcut_bias) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = group_norm(x, self.norm1, silu=True)
        if temb is None:
            h = conv2d(self.conv1, h)  # (B, C_out, H, W)
        else:
            if self.time_emb_proj is None:
                raise ValueError("temb: this ResnetBlock2D was built with temb_channels=None and takes no time embedding")
            t = ops.linear(F.silu(temb), self.time_emb_proj.weight, self.time_emb_proj.bias)  # (B, C_out)
            if t.shape[0] == 1 and isinstance(self.conv1, nn.Conv2d) and self.conv1.bias is not None:
                h = conv2d(self.conv1, h, bias=self.conv1.bias + t[0])  # one sample: temb folded into the bias
            else:
                h = conv2d(self.conv1, h) + t[:, :, None, None]  # broadcast (B, C_out, 1, 1)
        h = group_norm(h, self.norm2, silu=True)
        shortcut = conv2d(self.conv_shortcut, x) if self.conv_shortcut is not None else x
        if self.output_scale_factor == 1.0:
            return conv2d(self.conv2, h, residual=shortcut)  # shortcut + conv2(h), the add fused
        return (shortcut + conv2d(self.conv2, h)) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (`conv`); padding=0 pads right/bottom by one first, as diffusers (VAE).
    use_conv=False: 2x2 average pooling."""

    def __init__(self, channels: int, out_channels: int | None = None, *, use_conv: bool = True, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=padding)
        elif out_channels != channels:
            raise ValueError(f"out_channels: pooling keeps the {channels} channels, got {out_channels}")
        else:
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv, nn.Conv2d) and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return conv2d(self.conv, x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `output_size`, for odd maps), then a 3x3 conv (`conv`)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return conv2d(self.conv, x) if self.conv is not None else x


# ----------------------------------------------------------------------------------------------
# attention and transformer blocks


class Attention(nn.Module):
    """Multi-head attention over token sequences, diffusers' names: to_q, to_k, to_v, to_out.0.

    x: (B, Lq, query_dim); context: (B, Lk, cross_attention_dim) or None for self-attention.
    shared_kv=True: one projection `to_kv` serves as both keys and values (MobileDiffusion).
    kind: "softmax" or "relu" (ops.attention). upcast_attention is kept for the record: ops.attention
    always forms scores and softmax in fp32, which is what upcasting asks for.

    IP-Adapter (set_ip_adapters on a cross-attention layer): each adapter adds one more attention
    of the same queries over its image-prompt tokens, with its own K/V projections (to_k_ip.i,
    to_v_ip.i, bias-free), times its scale, before to_out, as diffusers' IPAdapterAttnProcessor2_0.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64, *,
                 bias: bool = False, out_bias: bool = True, upcast_attention: bool = False, shared_kv: bool = False,
                 kind: str = "softmax"):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.upcast_attention = upcast_attention
        self.kind = kind
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        if shared_kv:
            self.to_kv = nn.Linear(context_dim, inner_dim, bias=bias)
        else:
            self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
            self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.shared_kv = shared_kv
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias)])  # diffusers' [1] is dropout
        self.to_k_ip, self.to_v_ip = nn.ModuleList(), nn.ModuleList()  # IP-Adapter K/V, one per adapter
        self.ip_scales: list[float] = []

    def set_ip_adapters(self, keys: list[torch.Tensor], values: list[torch.Tensor], scales: list[float]):
        """One (inner, context_dim) key and value weight and one scale per adapter; [] removes them."""
        if not (len(keys) == len(values) == len(scales)):
            raise ValueError(f"keys, values, scales: one each per adapter, got {len(keys)}, {len(values)}, {len(scales)}")
        kv_weight = (self.to_kv if self.shared_kv else self.to_k).weight
        if keys and not isinstance(kv_weight, torch.Tensor):
            raise TypeError("keys, values: this attention layer is quantized (fastdiff.quantize); set IP-Adapters "
                            "before quantizing")
        inner, context_dim = kv_weight.shape
        projections = []
        for name, weights in (("keys", keys), ("values", values)):
            layers = nn.ModuleList()
            for w in weights:
                if tuple(w.shape) != (inner, context_dim):
                    raise ValueError(f"{name}: expected ({inner}, {context_dim}) weights, got {tuple(w.shape)}")
                layer = nn.Linear(context_dim, inner, bias=False, device="meta")
                layer.weight = nn.Parameter(w.to(kv_weight), requires_grad=False)
                layers.append(layer)
            projections.append(layers)
        self.to_k_ip, self.to_v_ip = projections
        self.set_ip_scales(scales)

    def set_ip_scales(self, scales: list[float]):
        if len(scales) != len(self.to_k_ip):
            raise ValueError(f"scales: one per IP-Adapter ({len(self.to_k_ip)}), got {len(scales)}")
        self.ip_scales = [float(s) for s in scales]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, ip_context: list[torch.Tensor] | None = None) -> torch.Tensor:
        """residual (B, Lq, query_dim), when given, is added to the output by to_out's GEMM.
        ip_context: one (B, L_i, context_dim) token tensor per IP-Adapter, for a layer that has them."""
        B, Lq, _ = x.shape
        context = x if context is None else context
        Lk, H, D = context.shape[1], self.heads, self.dim_head
        q = ops.linear(x, self.to_q.weight, self.to_q.bias).view(B, Lq, H, D)  # (B, Lq, H, D) view of the projection
        if self.shared_kv:
            k, v = ops.linear(context, self.to_kv.weight, self.to_kv.bias).view(B, Lk, H, D), None
        else:
            k = ops.linear(context, self.to_k.weight, self.to_k.bias).view(B, Lk, H, D)
            v = ops.linear(context, self.to_v.weight, self.to_v.bias).view(B, Lk, H, D)
        out = ops.attention(q, k, v, scale=self.scale, kind=self.kind)  # (B, Lq, H, D)
        if ip_context is not None and len(self.to_k_ip):
            for tokens, to_k, to_v, weight in zip(ip_context, self.to_k_ip, self.to_v_ip, self.ip_scales, strict=True):
                if weight == 0:  # as diffusers: the adapter is skipped, not added times 0
                    continue
                L = tokens.shape[1]
                k_ip = ops.linear(tokens, to_k.weight).view(B, L, H, D)
                v_ip = ops.linear(tokens, to_v.weight).view(B, L, H, D)
                out = out + weight * ops.attention(q, k_ip, v_ip, scale=self.scale, kind=self.kind)
        to_out = self.to_out[0]
        return ops.linear(out.reshape(B, Lq, H * D), to_out.weight, to_out.bias, residual=residual)  # reshape: a view


class GLUProjection(nn.Module):
    """`proj` to 2*dim_out, then a * act(gate) via ops.glu: GEGLU (gelu) or SwiGLU (silu)."""

    def __init__(self, dim_in: int, dim_out: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.glu(ops.linear(x, self.proj.weight, self.proj.bias), activation=self.activation)  # (..., 2F) -> (..., F)


class FeedForward(nn.Module):
    """net.0 = GLUProjection(dim -> inner), net.2 = Linear(inner -> dim_out); inner = dim * mult."""

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: float = 4, inner_dim: int | None = None,
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        inner_dim = inner_dim or int(dim * mult)
        # index 1 is diffusers' dropout: an Identity keeps net.2's name.
        self.net = nn.ModuleList([GLUProjection(dim, inner_dim, activation, bias), nn.Identity(),
                                  nn.Linear(inner_dim, dim_out or dim, bias=bias)])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual (the output's shape), when given, is added by net.2's GEMM."""
        return ops.linear(self.net[0](x), self.net[2].weight, self.net[2].bias, residual=residual)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens (B, L, dim):

        x += attn1(norm1(x))            self-attention (cross-attention if only_cross_attention)
        x += attn2(norm2(x), context)   when cross_attention_dim is set
        x += ff(norm3(x))

    self_attention=False drops norm1/attn1 (MobileDiffusion's cross-attention-only blocks).
    `attention` kwargs go to both Attention modules (shared_kv, kind, bias); ff_mult and
    ff_activation shape the FeedForward.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
                 cross_attention_dim: int | None = None, only_cross_attention: bool = False, self_attention: bool = True,
                 upcast_attention: bool = False, norm_eps: float = 1e-5, ff_mult: float = 4, ff_activation: str = "gelu",
                 **attention):
        super().__init__()
        heads = dict(heads=num_attention_heads, dim_head=attention_head_dim, upcast_attention=upcast_attention, **attention)
        self.only_cross_attention = only_cross_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **heads)
        else:
            self.norm1 = self.attn1 = None
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim, **heads)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, mult=ff_mult, activation=ff_activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                ip_context: list[torch.Tensor] | None = None) -> torch.Tensor:
        # each residual add runs in the epilogue of the sublayer's output GEMM
        if self.attn1 is not None:
            x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, residual=x)
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context, residual=x, ip_context=ip_context)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel for continuous inputs:

        tokens = proj_in(norm(x)) -> transformer_blocks -> proj_out;  out = x + tokens as a map

    proj_in / proj_out: 1x1 conv, or Linear when use_linear_projection (SD2.x); either runs as a
    GEMM on the channels_last tokens. Extra kwargs go to every BasicTransformerBlock.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *, num_layers: int = 1,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32, use_linear_projection: bool = False,
                 **block):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim,
                                  cross_attention_dim=cross_attention_dim, **block)
            for _ in range(num_layers)
        ])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                ip_context: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = to_tokens(group_norm(x, self.norm))  # (B, H*W, C), a view for channels_last x
        tokens = ops.linear(tokens, self.proj_in.weight, self.proj_in.bias)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, ip_context)
        tokens = ops.linear(tokens, self.proj_out.weight, self.proj_out.bias, residual=to_tokens(x))  # (B, H*W, C), x added by the GEMM
        return from_tokens(tokens, H, W)  # (B, C, H, W) channels_last
