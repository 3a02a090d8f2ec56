"""The Stable-Diffusion-family conditional UNet (SD1.x, SD2.x, InstructPix2Pix, MGIE's editor) on
fastdiff.ops, loading diffusers' UNet2DConditionModel weights as they are.

    sample (B, in_ch, h, w), timestep, text (B, L, cross_dim)
      -> conv_in -> down blocks (resnets [+ transformers], stride-2 conv) -> mid block
      -> up blocks (concat skips, resnets [+ transformers], nearest x2 + conv) -> GN+SiLU -> conv_out
      -> noise prediction (B, out_ch, h, w)

Block types: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn (or none), CrossAttnUpBlock2D,
UpBlock2D. Activations stay in the model's dtype (fp32 or bf16) and channels_last throughout.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import checkpoint
from .layers import ResnetBlock2D, Timesteps, TimestepEmbedding, Transformer2DModel, Downsample2D, Upsample2D, conv2d, group_norm, inference_only
from .unet_common import ConditionalUNet, DeepCacheRows, describe

__all__ = ["UNet2DCondition", "UNet2DConditionConfig"]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Config fields this model does not implement, with the only value it accepts (diffusers' default).
UNSUPPORTED_FIELDS = {
    "num_attention_heads": None,  # diffusers itself refuses it: heads come from attention_head_dim
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
}
# Fields accepted and ignored: bookkeeping, training-only, or unused by the block types above
# (diffusers passes them only to SimpleCrossAttn / ResnetDownsample / text-embedding variants).
IGNORED_FIELDS = (
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "dropout",
    "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm", "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
)


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """The supported part of diffusers' UNet2DConditionModel config, with diffusers' defaults.

    attention_head_dim is, as in diffusers, the NUMBER of heads per block (a historical misnomer);
    head size = block channels // heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM: a guidance embedding (timestep_cond) added to the time embedding
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding and the sinusoidal features
    # of the size/crop ids, concatenated (projection_class_embeddings_input_dim wide) and embedded
    # like the timestep, added to the time embedding. Without "text_time" diffusers ignores the two
    # widths, and so does this model.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNet2DConditionConfig":
        """From a diffusers config dict (model.config or config.json). A field this model does not
        implement, set to anything but its default, raises ValueError naming the field."""
        if not isinstance(config, dict):
            config = dict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in config.items():
            if key in known:
                values[key] = tuple(_tuples(v) for v in value) if isinstance(value, list) else value
            elif key in UNSUPPORTED_FIELDS:
                if value != UNSUPPORTED_FIELDS[key]:
                    raise ValueError(
                        f"config field {key!r}={value!r} is not supported by fastdiff.UNet2DCondition "
                        f"(only {UNSUPPORTED_FIELDS[key]!r})"
                    )
            elif key not in IGNORED_FIELDS:
                raise ValueError(f"config field {key!r} is unknown to fastdiff.UNet2DCondition")
        return cls(**values)

    def __post_init__(self):
        n = len(self.down_block_types)
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"config field {name!r}: block types {bad} are not supported (only {allowed})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"config field 'mid_block_type'={self.mid_block_type!r} is not supported (only {MID_BLOCK_TYPES})")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"config fields 'down_block_types', 'up_block_types', 'block_out_channels' need equal lengths, got "
                f"{n}, {len(self.up_block_types)}, {len(self.block_out_channels)}"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"config field 'act_fn'={self.act_fn!r} is not supported (only 'silu')")
        if self.time_embedding_type != "positional":
            raise ValueError(f"config field 'time_embedding_type'={self.time_embedding_type!r} is not supported (only 'positional')")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"config field 'norm_num_groups'={self.norm_num_groups!r} is not supported (an int is needed)")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            raise ValueError(f"config field 'cross_attention_dim'={self.cross_attention_dim!r}: one value for all blocks is supported")
        # Only blocks that run attention use their head count (diffusers ignores it elsewhere), and
        # head size = channels // heads, floored as diffusers does: refuse only a head size of 0.
        heads = self.per_block("attention_head_dim")
        for i in sorted(self.attention_blocks()):
            if not isinstance(heads[i], int) or not 1 <= heads[i] <= self.block_out_channels[i]:
                raise ValueError(
                    f"config field 'attention_head_dim' (the number of heads): block {i} has attention over "
                    f"{self.block_out_channels[i]} channels, which cannot make {heads[i]!r} heads"
                )
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"config field 'addition_embed_type'={self.addition_embed_type!r} is not supported "
                             f"(only None or SDXL's 'text_time')")
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"config field {name!r}: addition_embed_type 'text_time' needs a positive int, "
                                     f"got {value!r}")
        for kernel in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, kernel) % 2 != 1:
                raise ValueError(f"config field {kernel!r}: an odd kernel size is needed, got {getattr(self, kernel)}")

    def per_block(self, name: str) -> list:
        """Field `name` as one value per down block (ints and bools are repeated)."""
        value = getattr(self, name)
        n = len(self.down_block_types)
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"config field {name!r}: expected {n} values (one per block), got {value!r}")
            return list(value)
        return [value] * n

    def attention_blocks(self) -> set[int]:
        """Indices (in down-block order) of the blocks whose transformers use attention_head_dim[i]:
        cross-attention down blocks, the up blocks mirroring them, and the mid block (the last)."""
        n = len(self.down_block_types)
        blocks = {i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"}
        blocks |= {n - 1 - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"}
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            blocks.add(n - 1)
        return blocks

    @property
    def cross_dim(self) -> int:
        return self.per_block("cross_attention_dim")[0]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _per_layer(name: str, value, num_layers: int) -> list[int]:
    """transformer_layers_per_block entry for one block: an int, or one int per resnet layer."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers:
        raise ValueError(f"config field {name!r}: expected {num_layers} per-layer values for a block, got {value!r}")
    return list(value)


class UNetBlock2D(nn.Module):
    """Down, mid or up block of the SD UNet: `resnets`, optional `attentions` (Transformer2DModel
    after each resnet), optional `downsamplers` / `upsamplers`; diffusers' module names. A block
    without attention has no `attentions` attribute, as diffusers' DownBlock2D / UpBlock2D (its
    IP-Adapter scale expansion tells blocks apart by it)."""

    def __init__(self, resnets, attentions=None, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def attention(self, i: int, x: torch.Tensor, context: torch.Tensor, ip_context=None) -> torch.Tensor:
        return self.attentions[i](x, context, ip_context) if hasattr(self, "attentions") else x


class UNet2DCondition(ConditionalUNet):
    """diffusers' UNet2DConditionModel on fastdiff.ops; state_dict names match it exactly.

    unet(sample, timestep, encoder_hidden_states) -> noise prediction (B, out_channels, H, W),
    channels_last, in the model's dtype; inputs as ConditionalUNet describes. Inference only: forward
    runs under torch.no_grad() unless `trainable` is set (layers.inference_only). Build with UNet2DCondition.from_diffusers(model or folder) or
    UNet2DCondition(UNet2DConditionConfig(...)).
    """

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        self.config = config
        channels = list(config.block_out_channels)
        n = len(channels)
        heads = config.per_block("attention_head_dim")  # number of heads per block (diffusers' naming)
        layers = config.per_block("layers_per_block")
        only_cross = config.per_block("only_cross_attention")
        transformer_layers = config.per_block("transformer_layers_per_block")
        groups, eps = config.norm_num_groups, config.norm_eps
        time_embed_dim = config.time_embedding_dim or channels[0] * 4

        def resnet(c_in, c_out, scale=1.0):
            return ResnetBlock2D(c_in, c_out, temb_channels=time_embed_dim, groups=groups, eps=eps, output_scale_factor=scale)

        def transformer(c, block, num_layers, only_cross_attention=False):
            return Transformer2DModel(heads[block], c // heads[block], c, num_layers=num_layers,
                                      cross_attention_dim=config.cross_dim, norm_num_groups=groups,
                                      use_linear_projection=config.use_linear_projection,
                                      only_cross_attention=only_cross_attention, upcast_attention=config.upcast_attention)

        # input and time embedding
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], config.conv_in_kernel, padding=config.conv_in_kernel // 2)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, cond_proj_dim=config.time_cond_proj_dim)
        if config.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_embed_dim)

        # down: block i maps channels[i-1] -> channels[i]; all but the last halve the resolution
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            c_in, c_out = channels[max(i - 1, 0)], channels[i]
            per_layer = _per_layer("transformer_layers_per_block", transformer_layers[i], layers[i])
            resnets = [resnet(c_in if j == 0 else c_out, c_out) for j in range(layers[i])]
            attentions = [transformer(c_out, i, per_layer[j], only_cross[i]) for j in range(layers[i])] \
                if block_type == "CrossAttnDownBlock2D" else None
            downsample = Downsample2D(c_out, padding=config.downsample_padding) if i < n - 1 else None
            self.down_blocks.append(UNetBlock2D(resnets, attentions, downsample=downsample))

        # mid: resnet, (transformer, resnet)
        if config.mid_block_type == "UNetMidBlock2DCrossAttn":
            c, scale = channels[-1], config.mid_block_scale_factor
            # its one layer takes the last block's entry, a per-layer tuple's first, as diffusers' mid block
            last = transformer_layers[-1]
            mid_layers = last if isinstance(last, int) else last[0]
            self.mid_block = UNetBlock2D([resnet(c, c, scale), resnet(c, c, scale)], [transformer(c, n - 1, mid_layers)])
        else:
            self.mid_block = None

        # up: block i (deepest first) takes one more resnet than its down twin, each eating a skip
        if config.reverse_transformer_layers_per_block is not None:
            up_transformer_layers = list(config.reverse_transformer_layers_per_block)
        else:
            up_transformer_layers = transformer_layers[::-1]
        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        for i, block_type in enumerate(config.up_block_types):
            block = n - 1 - i  # the down block this one mirrors (heads, layers, cross-only flags)
            c_prev, c_out, c_skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
            num_layers = layers[block] + 1
            per_layer = _per_layer("reverse_transformer_layers_per_block", up_transformer_layers[i], num_layers)
            resnets = [
                resnet((c_prev if j == 0 else c_out) + (c_skip_in if j == num_layers - 1 else c_out), c_out)
                for j in range(num_layers)
            ]
            attentions = [transformer(c_out, block, per_layer[j], only_cross[block]) for j in range(num_layers)] \
                if block_type == "CrossAttnUpBlock2D" else None
            upsample = Upsample2D(c_out) if i < n - 1 else None
            self.up_blocks.append(UNetBlock2D(resnets, attentions, upsample=upsample))

        # output
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, config.conv_out_kernel, padding=config.conv_out_kernel // 2)
        # conv weights in the activations' layout, or every conv call would re-layout its weight
        self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_diffusers(cls, model_or_folder, dtype: torch.dtype | None = None, device=None) -> "UNet2DCondition":
        """From an in-memory diffusers UNet2DConditionModel, or from a folder (a diffusers model
        folder with config.json + diffusion_pytorch_model.safetensors/.bin, or a pipeline folder
        with it in unet/). Reading a folder does not import diffusers. dtype defaults to float32.
        Linear and norm weights already in the target dtype and device are shared with the source
        model, not copied (most of SD1.5's 3.4 GB); 3x3 conv weights get a channels_last copy."""
        if isinstance(model_or_folder, (str, os.PathLike)):
            config, state_dict = checkpoint.read_model_folder(model_or_folder, subfolder="unet")
        elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
            config, state_dict = dict(model_or_folder.config), model_or_folder.state_dict()
        else:
            raise TypeError(
                f"model_or_folder: expected a diffusers UNet2DConditionModel or a folder path, got {type(model_or_folder).__name__}"
            )
        with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
            model = cls(UNet2DConditionConfig.from_diffusers(config))
        dtype = dtype or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        state_dict = checkpoint.match_state_dict(state_dict, model.state_dict(), owner="UNet2DCondition")
        state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, assign=True)
        return model.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict that also takes wrapped / prefixed state_dicts ("module.",
        "unet.", {"state_dict": ...}; e.g. MGIE's unet.pt) and raises checkpoint.CheckpointError
        listing missing / unexpected keys and shape mismatches."""
        state_dict = checkpoint.match_state_dict(state_dict, self.state_dict(), strict=strict, owner="UNet2DCondition")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # assigned tensors keep the checkpoint's layout
            self.to(memory_format=torch.channels_last)
        return result

    def load_weights(self, path: str | os.PathLike) -> "UNet2DCondition":
        """Load a weight file (.safetensors, or a .pt/.bin/.pth state_dict pickle such as MGIE's unet.pt)."""
        self.load_state_dict(checkpoint.read_state_dict(path))
        return self

    # ------------------------------------------------------------------------------------------
    # inference

    @property
    def cross_attention_dim(self) -> int:
        return self.config.cross_dim

    # ------------------------------------------------------------------------------------------
    # IP-Adapter: image-prompt tokens through added K/V on the cross-attention layers

    def cross_attention_layers(self) -> dict[str, nn.Module]:
        """The attn2 layers by module path (diffusers' processor names without '.processor')."""
        return {name: m for name, m in self.named_modules() if name.endswith(".attn2")}

    @property
    def num_ip_adapters(self) -> int:
        count = 0  # a loop, not max(generator, default=): torch.compile traces this without a graph break
        for layer in self.cross_attention_layers().values():
            count = max(count, len(layer.to_k_ip))
        return count

    def set_ip_adapters(self, layers: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]):
        """IP-Adapter K/V weights (and scales) per cross-attention layer: {path: [(key weight, value
        weight, scale) per adapter]} for the layers in `cross_attention_layers()` that take image
        prompts, each with the same number of adapters; {} removes every adapter. Weights are
        copied to the model's dtype and device. Checked in full before any layer changes."""
        targets = self.cross_attention_layers()
        unknown = sorted(set(layers) - set(targets))
        if unknown:
            raise ValueError(f"layers: {unknown[:2]} are not cross-attention layers of this UNet (e.g. {next(iter(targets), None)!r})")
        counts = {len(adapters) for adapters in layers.values()}
        if len(counts) > 1:
            raise ValueError(f"layers: every layer needs the same number of IP-Adapters, got {sorted(counts)}")
        for name, layer in targets.items():  # shapes first: a bad one leaves every layer as it was
            if layers.get(name) and not isinstance((layer.to_kv if layer.shared_kv else layer.to_k).weight, torch.Tensor):
                raise TypeError(f"layers[{name!r}]: this layer is quantized (fastdiff.quantize); set IP-Adapters "
                                f"before quantizing")
            inner, context_dim = layer.to_q.weight.shape[0], self.cross_attention_dim
            for k, v, _ in layers.get(name, []):
                if tuple(k.shape) != (inner, context_dim) or tuple(v.shape) != (inner, context_dim):
                    raise ValueError(f"layers[{name!r}]: expected ({inner}, {context_dim}) key and value weights, "
                                     f"got {tuple(k.shape)} and {tuple(v.shape)}")
        for name, layer in targets.items():
            adapters = layers.get(name, [])
            layer.set_ip_adapters([k for k, _, _ in adapters], [v for _, v, _ in adapters], [s for _, _, s in adapters])

    def set_ip_adapter_scales(self, scales: dict[str, list[float]]):
        """Each listed layer's adapter scales (0 skips an adapter there)."""
        layers = self.cross_attention_layers()
        for name, values in scales.items():
            if name not in layers:
                raise ValueError(f"scales: {name!r} is not a cross-attention layer of this UNet")
            layers[name].set_ip_scales(values)

    def _check_ip_hidden_states(self, ip_hidden_states, batch: int) -> list[torch.Tensor] | None:
        n = self.num_ip_adapters
        if ip_hidden_states is None:
            if n:
                raise ValueError(f"ip_hidden_states: this UNet has {n} IP-Adapter(s) loaded; pass their image-prompt "
                                 f"tokens, one ({batch}, L, {self.cross_attention_dim}) tensor each")
            return None
        if not n:
            raise ValueError("ip_hidden_states: no IP-Adapter is loaded (set_ip_adapters)")
        if not isinstance(ip_hidden_states, (list, tuple)) or len(ip_hidden_states) != n:
            raise ValueError(f"ip_hidden_states: expected a list of {n} tensors (one per IP-Adapter), got {describe(ip_hidden_states)}")
        checked = []
        for i, tokens in enumerate(ip_hidden_states):
            if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
                raise TypeError(f"ip_hidden_states[{i}]: expected a floating-point tensor, got {describe(tokens)}")
            if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != self.cross_attention_dim:
                raise ValueError(f"ip_hidden_states[{i}]: expected shape ({batch}, L, {self.cross_attention_dim}), "
                                 f"got {tuple(tokens.shape)}")
            if tokens.device != self.device:
                raise ValueError(f"ip_hidden_states[{i}]: on {tokens.device}, the model is on {self.device}")
            checked.append(tokens.to(self.dtype))
        return checked

    def _added_embedding_input(self, text_embeds, time_ids, batch: int) -> torch.Tensor | None:
        """SDXL's add_embedding input, as diffusers builds it: [text_embeds, sinusoidal features of
        each time id] per row, (B, projection_class_embeddings_input_dim) in the model's dtype."""
        config = self.config
        if config.addition_embed_type != "text_time":
            for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
                if value is not None:
                    raise ValueError(f"{name}: this UNet has no added conditioning (config addition_embed_type is "
                                     f"{config.addition_embed_type!r}, not 'text_time'); pass None")
            return None
        width, per_id = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if value is None:
                raise ValueError(f"{name}: this UNet (addition_embed_type 'text_time', SDXL) needs text_embeds "
                                 f"(B, pooled width) and time_ids (B, n): pooled width + n x {per_id} = {width}")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point ({batch}, n) tensor, got {describe(value)}")
            if value.dim() != 2 or value.shape[0] != batch:
                raise ValueError(f"{name}: expected shape ({batch}, n) for a batch of {batch}, got {tuple(value.shape)}")
            if value.device != self.device:
                raise ValueError(f"{name}: on {value.device}, the model is on {self.device}")
        if text_embeds.shape[1] + time_ids.shape[1] * per_id != width:
            raise ValueError(f"text_embeds, time_ids: widths {text_embeds.shape[1]} + {time_ids.shape[1]} x {per_id} "
                             f"(addition_time_embed_dim) must make projection_class_embeddings_input_dim {width}")
        time_features = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)  # fp32, as diffusers
        return torch.cat([text_embeds.to(time_features.dtype), time_features], dim=-1).to(self.dtype)

    def _check_timestep_cond(self, timestep_cond, batch: int) -> torch.Tensor | None:
        if timestep_cond is None:
            return None
        dim = self.config.time_cond_proj_dim
        if dim is None:
            raise ValueError("timestep_cond: this UNet has no guidance embedding (config time_cond_proj_dim is None); "
                             "pass None")
        if not isinstance(timestep_cond, torch.Tensor) or not timestep_cond.is_floating_point():
            raise TypeError(f"timestep_cond: expected a floating-point ({batch}, {dim}) tensor, got {describe(timestep_cond)}")
        if timestep_cond.dim() != 2 or timestep_cond.shape[0] not in (1, batch) or timestep_cond.shape[1] != dim:
            raise ValueError(f"timestep_cond: expected shape ({batch}, {dim}) (config time_cond_proj_dim {dim}), "
                             f"got {tuple(timestep_cond.shape)}")
        if timestep_cond.device != self.device:
            raise ValueError(f"timestep_cond: on {timestep_cond.device}, the model is on {self.device}")
        return timestep_cond.to(self.dtype)

    @inference_only
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *, timestep_cond=None,
                text_embeds=None, time_ids=None,
                ip_hidden_states=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, cache: DeepCacheRows | None = None) -> torch.Tensor:
        """sample: (B, in_channels, H, W); timestep: a number, a 0-d tensor or (B,) tensor;
        encoder_hidden_states: (B, L, cross_attention_dim). Returns (B, out_channels, H, W).
        timestep_cond: (B, time_cond_proj_dim) (or (1, ...) for all), LCM's guidance embedding, for a
        model built with time_cond_proj_dim; without it the time embedding is the timestep's alone, as in diffusers.
        text_embeds (B, P), time_ids (B, n): SDXL's added conditioning (diffusers' added_cond_kwargs), needed
        by and only by a model with addition_embed_type "text_time"; P + n x addition_time_embed_dim =
        projection_class_embeddings_input_dim (SDXL: 1280 pooled + 6 ids x 256 = 2816).
        ip_hidden_states: with IP-Adapters loaded (set_ip_adapters), one (B, L_i, cross_attention_dim)
        tensor of image-prompt tokens per adapter.
        ControlNet residuals, as diffusers takes them: down_block_additional_residuals, one tensor per
        skip feature (conv_in's output first), added to the skips; mid_block_additional_residual added
        to the mid block's output. cache: DeepCache per row (see DeepCacheRows)."""
        x, timestep, context = self._check_inputs(sample, timestep, encoder_hidden_states)
        timestep_cond = self._check_timestep_cond(timestep_cond, x.shape[0])
        ip = self._check_ip_hidden_states(ip_hidden_states, x.shape[0])
        added = self._added_embedding_input(text_embeds, time_ids, x.shape[0])
        residuals = down_block_additional_residuals is not None or mid_block_additional_residual is not None
        if cache is not None and residuals:
            raise ValueError("cache: not with ControlNet residuals (down_block_additional_residuals, "
                             "mid_block_additional_residual): they change the deep features every step")

        def add_down_residuals(skips):  # one per skip, in the order the down blocks keep them
            residuals = list(down_block_additional_residuals)
            if len(residuals) != len(skips) or any(r.shape != s.shape for r, s in zip(residuals, skips)):
                raise ValueError(f"down_block_additional_residuals: expected {len(skips)} tensors of shapes "
                                 f"{[tuple(s.shape) for s in skips]}, got {[tuple(r.shape) for r in residuals]}")
            skips[:] = [s + r.to(dtype=s.dtype, memory_format=torch.channels_last) for s, r in zip(skips, residuals)]

        def add_mid_residual(x):
            if mid_block_additional_residual.shape != x.shape:
                raise ValueError(f"mid_block_additional_residual: expected shape {tuple(x.shape)}, "
                                 f"got {tuple(mid_block_additional_residual.shape)}")
            return x + mid_block_additional_residual.to(dtype=x.dtype, memory_format=torch.channels_last)

        # time embedding: (B,) -> sinusoidal (B, C0) in fp32 -> MLP (B, 4*C0) in the model dtype
        temb = self.time_embedding(self.time_proj(timestep).to(self.dtype), timestep_cond)
        if added is not None:  # SDXL: diffusers' aug_emb
            temb = temb + self.add_embedding(added)
        return self._run_levels(x, temb, (context, ip), cache,
                                after_down=add_down_residuals if down_block_additional_residuals is not None else None,
                                after_mid=add_mid_residual if mid_block_additional_residual is not None else None)

    # the levels, for ConditionalUNet._run_levels; context is (encoder_hidden_states, IP-Adapter tokens)

    @property
    def num_levels(self) -> int:
        return len(self.down_blocks)

    @property
    def max_cache_depth(self) -> int:
        return self.num_levels - (self.mid_block is None)  # without a mid block the deepest level is all that is deep

    def _stem(self, x, skips):
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        x = conv2d(self.conv_in, x)  # (B, C0, H, W) channels_last
        skips.append(x)
        return x

    def _down(self, level, x, temb, context, skips, deeper):
        # each resnet (+ transformer) output and each downsampled map is a skip
        block = self.down_blocks[level]
        for i, resnet in enumerate(block.resnets):
            x = block.attention(i, resnet(x, temb), *context)
            skips.append(x)
        if block.downsamplers is not None:
            if not deeper:
                return None
            x = block.downsamplers[0](x[:deeper])  # (deeper, C, ceil(h/2), ceil(w/2))
            skips.append(x)
        return x

    def _mid(self, x, temb, context):
        if self.mid_block is None:
            return x
        x = self.mid_block.resnets[0](x, temb)
        return self.mid_block.resnets[1](self.mid_block.attention(0, x, *context), temb)

    def _up(self, level, x, temb, context, skips):
        # concat the matching skip on channels before each resnet; upsample to the next skip's size
        # (2x, or the odd size the downsampler rounded up from)
        block = self.up_blocks[self.num_levels - 1 - level]
        for i, resnet in enumerate(block.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, h, w) channels_last
            x = block.attention(i, resnet(x, temb), *context)
        if block.upsamplers is not None:
            x = block.upsamplers[0](x, output_size=skips[-1].shape[2:])
        return x

    def _head(self, x):
        return conv2d(self.conv_out, group_norm(x, self.conv_norm_out, silu=True))  # GroupNorm + SiLU (fused), conv

