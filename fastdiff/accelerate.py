"""fastdiff.accelerate(pipe): a diffusers pipeline with its UNet and VAE running on fastdiff.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    pipe = fastdiff.accelerate(pipe, dtype="bf16")

`pipe.unet` (a diffusers UNet2DConditionModel) and `pipe.vae` (an AutoencoderKL) are replaced by
thin adapters around fastdiff.UNet2DCondition and fastdiff.AutoencoderKL that take the calls
diffusers' pipelines make and return diffusers' output types; everything else (text encoder,
scheduler, ControlNet, image processing) stays diffusers'. The adapters present the original
dtype to the pipeline: with dtype="bf16" the fastdiff models compute in bf16, inputs are cast in
and outputs cast back, so latents and scheduler arithmetic keep the pipeline's precision.

What fastdiff cannot run exactly raises UnsupportedError naming the feature, at accelerate time
when the pipeline shows it then, else at the call that asks for it: never a silently wrong image,
and never a half-changed pipeline. The pipeline's own `to`, `save_pretrained`,
`fuse_qkv_projections` and `prepare_ip_adapter_image_embeds` are wrapped (on the instance) for
that: diffusers changes components one by one, so what the adapters refuse is checked before any is
touched; saving writes the diffusers UNet and VAE the adapters replaced, so from_pretrained reloads
the plain pipeline; an ip_adapter_image without an IP-Adapter loaded is a ValueError naming it.

SDXL (StableDiffusionXLPipeline, its img2img and inpaint): the UNet's added conditioning
(added_cond_kwargs text_embeds and time_ids) runs in fastdiff's UNet; both text encoders stay
transformers'.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn as nn

from fastdiff.models.unet_2d_condition import UNet2DCondition
from fastdiff.models.vae import AutoencoderKL
from fastdiff.quantization import check_quantize, is_quantized
from fastdiff.quantization import quantize as quantize_model
from fastdiff.requests import resolve_dtype

__all__ = ["accelerate", "UnsupportedError", "DiffusersUNet", "DiffusersVAE"]

# Attention processors whose output fastdiff's attention reproduces (diffusers' defaults).
DEFAULT_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")
# ... and, once accelerated, the fused one: fastdiff computes the same attention from the same weights
# (the fused QKV weights diffusers adds are a layout fastdiff does not need).
ADAPTER_PROCESSORS = DEFAULT_PROCESSORS + ("FusedAttnProcessor2_0",)
# IP-Adapter's, on the UNet's cross-attention layers: their K/V weights and scales become fastdiff's
# (one more attention over the image-prompt tokens per adapter, layers.Attention.set_ip_adapters).
IP_PROCESSORS = ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0")


class UnsupportedError(NotImplementedError):
    """A diffusers feature fastdiff.accelerate does not run; the message names it."""


def accelerate(pipe, *, dtype=None, quantize=None):
    """Replace `pipe.unet` and `pipe.vae` with fastdiff-backed modules; returns `pipe` (changed in place).

    dtype: None (the UNet's own dtype), a torch.dtype or a name ("bf16", "fp32", ...): what the
    fastdiff models compute in. quantize: None, or "int8": the fastdiff UNet's linear and 1x1
    convolution weights in int8 (fastdiff.quantize; also on an already accelerated pipe). A quantized
    UNet is not saved back to diffusers (its float weights were not kept), and IP-Adapters must be
    loaded before accelerating with quantize. Raises TypeError if `pipe` has no `unet` and `vae`, UnsupportedError
    for a feature fastdiff does not run (a UNet or VAE class other than diffusers' UNet2DConditionModel
    and AutoencoderKL among them).
    """
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import UNet2DConditionModel

    check_quantize(quantize)
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if isinstance(unet, DiffusersUNet) and isinstance(vae, DiffusersVAE):  # again: a no-op unless dtype/quantize change
        wanted = unet.model.dtype if dtype is None else resolve_dtype(dtype, unet.device)
        if wanted != unet.model.dtype:
            raise UnsupportedError(f"dtype: pipe is already accelerated in {unet.model.dtype}; accelerate the plain "
                                   f"pipeline to run in {wanted}")
        if quantize and not is_quantized(unet.model):
            quantize_model(unet.model, quantize)
        _wrap_pipeline_methods(pipe)  # e.g. a pipeline built from an accelerated one's components
        return pipe
    if unet is None or vae is None:
        raise TypeError(f"pipe: expected a diffusers pipeline with a `unet` and a `vae`, got {type(pipe).__name__}")
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedError(f"pipe.unet: {type(unet).__name__} is not supported by fastdiff.accelerate "
                               f"(only diffusers' UNet2DConditionModel)")
    if not isinstance(vae, DiffusersAutoencoderKL):
        raise UnsupportedError(f"pipe.vae: {type(vae).__name__} is not supported by fastdiff.accelerate "
                               f"(only diffusers' AutoencoderKL)")
    compute_dtype = resolve_dtype(dtype if dtype is not None else unet.dtype, unet.device)
    new_unet = DiffusersUNet.from_diffusers(unet, compute_dtype)
    new_vae = DiffusersVAE.from_diffusers(vae, compute_dtype)
    if quantize:
        quantize_model(new_unet.model, quantize)
    pipe.unet, pipe.vae = new_unet, new_vae
    _wrap_pipeline_methods(pipe)
    return pipe


# -- the pipeline's own methods ----------------------------------------------------------------------

def _adapters(pipe) -> dict:
    return {name: getattr(pipe, name) for name in ("unet", "vae") if isinstance(getattr(pipe, name, None), _Adapter)}


def _wrap_pipeline_methods(pipe):
    """Instance attributes over the DiffusionPipeline methods that would half-change an accelerated
    pipeline or skip its adapters (the class and its model_index.json stay diffusers')."""
    from diffusers import DiffusionPipeline

    if isinstance(pipe, DiffusionPipeline):
        for name, method in (("to", _pipeline_to), ("save_pretrained", _pipeline_save_pretrained),
                             ("fuse_qkv_projections", _pipeline_fuse_qkv_projections),
                             ("prepare_ip_adapter_image_embeds", _pipeline_prepare_ip_adapter_image_embeds)):
            if hasattr(pipe, name):
                setattr(pipe, name, types.MethodType(method, pipe))


def _pipeline_to(pipe, *args, **kwargs):
    """diffusers' pipe.to, with a dtype change the adapters refuse refused first: diffusers converts
    the components one by one, and would leave the text encoder converted."""
    dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    for name, adapter in _adapters(pipe).items():
        adapter._check_dtype(dtype, f"pipe.to({dtype}) (pipe.{name})")
    return type(pipe).to(pipe, *args, **kwargs)


def _pipeline_save_pretrained(pipe, save_directory, *args, **kwargs):
    """diffusers' pipe.save_pretrained, saving the diffusers UNet and VAE the adapters stand for (their
    config, the fastdiff weights): diffusers skips modules it cannot save and writes [null, null] for
    them. The diffusers models are built before anything is written, so a refusal writes nothing."""
    adapters = _adapters(pipe)
    models = {name: adapter.to_diffusers(f"pipe.save_pretrained (pipe.{name})") for name, adapter in adapters.items()}
    try:
        for name, model in models.items():
            setattr(pipe, name, model)  # also what model_index.json records for it
        return type(pipe).save_pretrained(pipe, save_directory, *args, **kwargs)
    finally:
        for name, adapter in adapters.items():
            setattr(pipe, name, adapter)


def _pipeline_prepare_ip_adapter_image_embeds(pipe, ip_adapter_image=None, ip_adapter_image_embeds=None, *args, **kwargs):
    """diffusers' own, after checking that images can be projected: without an IP-Adapter loaded,
    diffusers fails on `unet.encoder_hid_proj.image_projection_layers` (None) with an AttributeError."""
    unet = getattr(pipe, "unet", None)
    if ip_adapter_image_embeds is None and isinstance(unet, DiffusersUNet) and unet.encoder_hid_proj is None:
        raise ValueError("ip_adapter_image: no IP-Adapter is loaded; load one first (pipe.load_ip_adapter(...)) "
                         "or leave ip_adapter_image out")
    return type(pipe).prepare_ip_adapter_image_embeds(pipe, ip_adapter_image, ip_adapter_image_embeds, *args, **kwargs)


def _pipeline_fuse_qkv_projections(pipe, unet: bool = True, vae: bool = True):
    """diffusers' pipe.fuse_qkv_projections without its check that pipe.vae is diffusers'
    AutoencoderKL, which the VAE adapter fails after the UNet is fused. unfuse_qkv_projections is
    diffusers' own (it reads the two flags)."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    pipe.fusing_unet, pipe.fusing_vae = bool(unet), bool(vae)
    for name, wanted in (("unet", unet), ("vae", vae)):
        if wanted:
            getattr(pipe, name).fuse_qkv_projections()
            getattr(pipe, name).set_attn_processor(FusedAttnProcessor2_0())


# -- checks shared by both models ------------------------------------------------------------------

def _check_processors(model, owner: str, accepted: tuple = DEFAULT_PROCESSORS):
    """Custom attention processors (fused QKV, xformers, user-written) compute something fastdiff's
    attention does not: refuse them by class name."""
    odd = sorted({type(p).__name__ for p in model.attn_processors.values()} - set(accepted))
    if odd:
        raise UnsupportedError(f"{owner}: attention processors {odd} are not supported by fastdiff.accelerate "
                               f"(only {list(accepted)})")


def _ip_scales(processor, name: str, what: str) -> list[float]:
    """An IP-Adapter processor's scales, one float per adapter; per-image lists (ip_adapter_masks') are refused."""
    if any(isinstance(scale, (list, tuple)) for scale in processor.scale):
        raise UnsupportedError(f"{what}: per-image IP-Adapter scales at {name} (for ip_adapter_masks) are not "
                               f"supported by fastdiff.accelerate")
    return [float(scale) for scale in processor.scale]


def _ip_layers(processors: dict, what: str) -> dict:
    """UNet2DCondition.set_ip_adapters' argument from diffusers' processors by name: the IP-Adapter
    processors' K/V weights and scales, by cross-attention layer."""
    layers = {}
    for name, processor in processors.items():
        if type(processor).__name__ not in IP_PROCESSORS:
            continue
        if not name.endswith(".attn2.processor"):
            raise UnsupportedError(f"{what}: an IP-Adapter processor on {name}, not a cross-attention layer, is not "
                                   f"supported by fastdiff.accelerate")
        scales = _ip_scales(processor, name, what)
        layers[name.removesuffix(".processor")] = [(k.weight, v.weight, scale) for k, v, scale
                                                   in zip(processor.to_k_ip, processor.to_v_ip, scales, strict=True)]
    return layers


def _fused_state_dict(model, owner: str) -> dict:
    """The model's state_dict with peft LoRA layers reduced to their base layers, which hold the
    LoRA deltas once fused (pipe.fuse_lora()). Unfused adapters would be lost: refused."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, no LoRA layers can be in the model
        return model.state_dict()
    tuners = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    unfused = [name for name, m in model.named_modules()
               if isinstance(m, BaseTunerLayer) and (not m.merged or m.disable_adapters)]
    if unfused:
        raise UnsupportedError(
            f"{owner}: unfused LoRA (peft layers at {unfused[:3]}{' ...' if len(unfused) > 3 else ''}) is not supported by "
            f"fastdiff.accelerate, nor a LoRA scale in cross_attention_kwargs: call pipe.fuse_lora(lora_scale=...) "
            f"before accelerate")
    state = {}
    for key, value in model.state_dict().items():
        owner_layer = next((t for t in tuners if key.startswith(t + ".")), None)
        if owner_layer is None:
            state[key] = value
        elif key.startswith(owner_layer + ".base_layer."):
            state[owner_layer + key[len(owner_layer) + len(".base_layer"):]] = value
        # else: the adapter's own lora_A/lora_B weights, already merged into the base layer
    return state


def _build(fastdiff_cls, model, compute_dtype, owner: str, skip: tuple = ()):
    """fastdiff_cls.from_diffusers on `model`'s config and fused weights (less the keys containing
    any of `skip`); config fields fastdiff cannot build are reported as unsupported features of `owner`."""
    def state_dict():
        return {k: v for k, v in _fused_state_dict(model, owner).items() if not any(part in k for part in skip)}

    source = types.SimpleNamespace(config=model.config, state_dict=state_dict)
    try:
        return fastdiff_cls.from_diffusers(source, dtype=compute_dtype, device=model.device)
    except ValueError as error:
        raise UnsupportedError(f"{owner}: {error}") from error


class _Adapter(nn.Module):
    """Holds a fastdiff model; presents `interface_dtype` (the diffusers model's) to the pipeline."""

    diffusers_class = ""  # the diffusers model class it replaces, by name
    accepted_processors = ADAPTER_PROCESSORS  # set_attn_processor takes these (by class name)

    def __init__(self, model: nn.Module, config, interface_dtype: torch.dtype, processors: dict):
        super().__init__()
        self.model = model
        self.config = config  # the diffusers model's FrozenDict, as pipelines read it
        self._interface_dtype = interface_dtype
        self._processors = dict(processors)  # diffusers' processors by layer name: all compute what fastdiff does
        self.original_attn_processors = None

    @property
    def dtype(self) -> torch.dtype:
        """What the pipeline feeds and gets back; the fastdiff model computes in `self.model.dtype`."""
        return self._interface_dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _check_dtype(self, dtype, what: str):
        """A dtype change would silently change what `accelerate(dtype=...)` chose: refused."""
        if dtype is not None and dtype != self.dtype:
            raise UnsupportedError(f"{what}: changing the dtype of an accelerated model ({self.dtype} to {dtype}) is not "
                                   f"supported; call fastdiff.accelerate(pipe, dtype=...) on the plain pipeline")

    def to(self, *args, **kwargs):
        """Device moves only (what pipe.to(device) asks); a dtype change is refused (_check_dtype)."""
        target = torch.empty(0, dtype=self.dtype, device=self.device).to(*args, **kwargs)
        self._check_dtype(target.dtype, f"{type(self).__name__}.to")
        self.model.to(target.device)
        return self

    # saving: as the diffusers model this adapter replaced

    def to_diffusers(self, what: str = "to_diffusers"):
        """The diffusers model this adapter replaced, rebuilt from its config and the fastdiff model's
        weights (same names and shapes) in the pipeline's dtype; weights are shared where the layout
        allows. Refused when the fastdiff model computes in a narrower dtype (accelerate(dtype="bf16")
        on an fp32 pipeline): the original weights were not kept, and rounded ones would pass for them."""
        import diffusers

        self._check_saveable(what)
        if torch.promote_types(self.model.dtype, self.dtype) != self.model.dtype:
            raise UnsupportedError(
                f"{what}: a diffusers model in {self.dtype} from one fastdiff.accelerate runs in {self.model.dtype} is "
                f"not supported (the {self.dtype} weights were not kept); save the pipeline before accelerating it")
        with torch.device("meta"):  # no random init: every parameter comes from the fastdiff model
            model = getattr(diffusers, self.diffusers_class).from_config(self.config)
        state = {k: v.to(self.dtype).contiguous() for k, v in self.model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    def _check_saveable(self, what: str):
        """What the diffusers model could not be rebuilt with raises UnsupportedError."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save_pretrained of the model this adapter replaced (to_diffusers)."""
        self.to_diffusers(f"{type(self).__name__}.save_pretrained").save_pretrained(save_directory, *args, **kwargs)

    # attention processors: diffusers' API; fastdiff's attention computes what the accepted ones do

    @property
    def attn_processors(self) -> dict:
        return dict(self._processors)

    def set_attn_processor(self, processor):
        """One processor for every attention layer, or a dict by layer name (attn_processors' keys).
        Only processors whose output fastdiff reproduces are taken; others raise UnsupportedError
        and change nothing."""
        if isinstance(processor, dict):
            if set(processor) != set(self._processors):
                raise ValueError(f"set_attn_processor: a dict of processors needs the {len(self._processors)} "
                                 f"attention layers of attn_processors as keys, got {len(processor)} "
                                 f"(e.g. {sorted(set(processor) ^ set(self._processors))[:2]} differ)")
            chosen = dict(processor)
        else:
            chosen = dict.fromkeys(self._processors, processor)
        odd = sorted({type(p).__name__ for p in chosen.values()} - set(self.accepted_processors))
        if odd:
            raise UnsupportedError(f"set_attn_processor: attention processors {odd} are not supported by "
                                   f"fastdiff.accelerate (only {list(self.accepted_processors)})")
        self._use_processors(chosen)
        self._processors = chosen

    def _use_processors(self, processors: dict):
        """What the model needs from newly set processors; raises before changing anything."""

    def set_default_attn_processor(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.set_attn_processor(AttnProcessor())

    def fuse_qkv_projections(self):
        """As diffusers records it (processors become FusedAttnProcessor2_0); fastdiff computes the
        same attention either way."""
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        self.original_attn_processors = self.attn_processors
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self):
        if self.original_attn_processors is not None:
            self.set_attn_processor(self.original_attn_processors)


# -- the UNet ----------------------------------------------------------------------------------

class DiffusersUNet(_Adapter):
    """fastdiff.UNet2DCondition called as diffusers' UNet2DConditionModel.

    IP-Adapter: loaded before accelerate or after it (pipe.load_ip_adapter calls
    _load_ip_adapter_weights), the image projection (`encoder_hid_proj`, any of diffusers' kinds)
    stays diffusers' and runs once per call; its image-prompt tokens go through fastdiff's attention
    with the adapters' K/V weights, scaled as pipe.set_ip_adapter_scale set the processors' scales.
    """

    diffusers_class = "UNet2DConditionModel"
    accepted_processors = ADAPTER_PROCESSORS + IP_PROCESSORS

    @classmethod
    def from_diffusers(cls, unet, compute_dtype: torch.dtype) -> "DiffusersUNet":
        config = unet.config
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
            raise UnsupportedError("pipe.unet: class embeddings (class_embed_type / num_class_embeds) are not supported "
                                   "by fastdiff.accelerate")
        if any(getattr(block, "b1", None) is not None for block in unet.up_blocks):
            raise UnsupportedError("pipe.unet: FreeU (pipe.enable_freeu) is not supported by fastdiff.accelerate; "
                                   "call pipe.disable_freeu() first")
        _check_processors(unet, "pipe.unet", DEFAULT_PROCESSORS + IP_PROCESSORS)
        image_projection = getattr(unet, "encoder_hid_proj", None)
        ip_layers = _ip_layers(unet.attn_processors, "pipe.unet")
        if image_projection is not None and getattr(config, "encoder_hid_dim_type", None) != "ip_image_proj":
            raise UnsupportedError(f"pipe.unet: encoder_hid_proj with encoder_hid_dim_type="
                                   f"{getattr(config, 'encoder_hid_dim_type', None)!r} is not supported by "
                                   f"fastdiff.accelerate (only IP-Adapter's 'ip_image_proj')")
        if (image_projection is None) != (not ip_layers):
            raise UnsupportedError("pipe.unet: an IP-Adapter loaded in part (an image projection without IP-Adapter "
                                   "attention processors, or the reverse) is not supported by fastdiff.accelerate")
        model = _build(UNet2DCondition, unet, compute_dtype, "pipe.unet", skip=("encoder_hid_proj.", ".processor."))
        model.set_ip_adapters(ip_layers)
        adapter = cls(model, config, unet.dtype, unet.attn_processors)
        adapter.encoder_hid_proj = image_projection
        return adapter

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_hid_proj = None  # diffusers' IP-Adapter image projection (MultiIPAdapterImageProjection)

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def add_embedding(self):
        """SDXL's added-conditioning embedding (its linear_1.in_features is what SDXL pipelines check
        their time ids against); None without addition_embed_type "text_time"."""
        return getattr(self.model, "add_embedding", None)

    @property
    def down_blocks(self):
        """fastdiff's blocks, diffusers' names (pipe.set_ip_adapter_scale reads which have attentions)."""
        return self.model.down_blocks

    @property
    def up_blocks(self):
        return self.model.up_blocks

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        if self.encoder_hid_proj is not None:
            self.encoder_hid_proj.to(self.device)
        return self

    def _use_processors(self, processors: dict):
        """IP-Adapter processors bring their K/V weights and scales to fastdiff's cross-attention
        layers; processors without them (pipe.unload_ip_adapter) remove them."""
        self.model.set_ip_adapters(_ip_layers(processors, "set_attn_processor"))

    def _check_saveable(self, what: str):
        if is_quantized(self.model):
            raise UnsupportedError(f"{what}: saving a UNet that fastdiff.accelerate(quantize=...) quantized is not "
                                   f"supported (its float weights were not kept); save the pipeline before accelerating it")
        if self.encoder_hid_proj is not None or self.model.num_ip_adapters:
            raise UnsupportedError(f"{what}: saving a UNet with an IP-Adapter loaded is not supported by "
                                   f"fastdiff.accelerate (diffusers keeps IP-Adapter weights apart: "
                                   f"pipe.unload_ip_adapter() first)")

    def _load_ip_adapter_weights(self, state_dicts, low_cpu_mem_usage=False):
        """What pipe.load_ip_adapter calls on diffusers' UNet, with diffusers' own conversions of the
        checkpoint (attention processors, image projection). IP-Adapter FaceID (LoRA layers) is refused;
        a refusal leaves the model as it was. low_cpu_mem_usage is accepted and not needed."""
        from diffusers.loaders.unet import UNet2DConditionLoadersMixin as Loader
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        state_dicts = state_dicts if isinstance(state_dicts, list) else [state_dicts]
        if any("lora" in key for state_dict in state_dicts for key in state_dict.get("ip_adapter", {})):
            raise UnsupportedError("load_ip_adapter: IP-Adapter FaceID (its LoRA layers) is not supported by "
                                   "fastdiff.accelerate")
        processors = Loader._convert_ip_adapter_attn_to_diffusers(self, state_dicts, low_cpu_mem_usage=False)
        projections = [Loader._convert_ip_adapter_image_proj_to_diffusers(self, state_dict["image_proj"],
                                                                          low_cpu_mem_usage=False)
                       for state_dict in state_dicts]
        for processor in processors.values():
            if isinstance(processor, nn.Module):
                processor.to(device=self.device, dtype=self.dtype)
        self.set_attn_processor(processors)
        self.encoder_hid_proj = MultiIPAdapterImageProjection(projections).to(device=self.device, dtype=self.dtype)
        self.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers marks it (unload_ip_adapter clears it)

    def _load_ip_adapter_loras(self, state_dicts) -> dict:
        """None to load: _load_ip_adapter_weights refuses the FaceID checkpoints that have them."""
        return {}

    def _ip_hidden_states(self, image_embeds) -> list[torch.Tensor] | None:
        """added_cond_kwargs['image_embeds'] through diffusers' image projection: one (B, images x
        tokens, cross_attention_dim) tensor per adapter, as IPAdapterAttnProcessor2_0 flattens them."""
        loaded = self.encoder_hid_proj is not None and getattr(self.config, "encoder_hid_dim_type", None) == "ip_image_proj"
        if not loaded:
            if image_embeds is not None:
                raise ValueError("added_cond_kwargs['image_embeds']: no IP-Adapter is loaded (pipe.load_ip_adapter)")
            return None
        if image_embeds is None:
            raise ValueError("added_cond_kwargs: an IP-Adapter is loaded and needs 'image_embeds' (the pipeline's "
                             "ip_adapter_image or ip_adapter_image_embeds)")
        self.model.set_ip_adapter_scales({name.removesuffix(".processor"): _ip_scales(p, name, "set_ip_adapter_scale")
                                          for name, p in self._processors.items() if type(p).__name__ in IP_PROCESSORS})
        with torch.no_grad():
            projected = self.encoder_hid_proj(image_embeds)
        return [tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]) for tokens in projected]

    def enable_freeu(self, *_, **__):
        raise UnsupportedError("FreeU (pipe.enable_freeu) is not supported by fastdiff.accelerate")

    def disable_freeu(self):
        """FreeU is never on (enable_freeu refuses, accelerate refuses a UNet with it): nothing to undo."""

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        """diffusers' UNet2DConditionModel.forward signature, its positional order included; returns
        UNet2DConditionOutput (or a 1-tuple with return_dict=False) in the input sample's dtype.
        class_labels are ignored, as diffusers ignores them in a UNet without class embeddings (the
        only kind accelerate takes). added_cond_kwargs: SDXL's text_embeds and time_ids, IP-Adapter's
        image_embeds."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        added = dict(added_cond_kwargs or {})
        image_embeds = added.pop("image_embeds", None)
        text_embeds, time_ids = added.pop("text_embeds", None), added.pop("time_ids", None)
        refused = {
            "attention_mask": (attention_mask is not None, "attention masks"),
            "encoder_attention_mask": (encoder_attention_mask is not None, "attention masks"),
            "cross_attention_kwargs": (bool(cross_attention_kwargs), "e.g. a LoRA scale on unfused LoRA: fuse LoRA "
                                       "with pipe.fuse_lora(lora_scale=...) before fastdiff.accelerate"),
            "added_cond_kwargs": (bool(added), f"{sorted(added)}: only text_embeds, time_ids and image_embeds"),
            "down_intrablock_additional_residuals": (down_intrablock_additional_residuals is not None,
                                                     "T2I-Adapter residuals"),
        }
        for name, (given, what) in refused.items():
            if given:
                raise UnsupportedError(f"{name}: not supported by fastdiff.accelerate ({what})")
        noise = self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                           text_embeds=text_embeds, time_ids=time_ids,
                           ip_hidden_states=self._ip_hidden_states(image_embeds),
                           down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual)
        noise = noise.to(sample.dtype).contiguous()  # diffusers returns contiguous NCHW
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)


# -- the VAE -----------------------------------------------------------------------------------

class DiffusersVAE(_Adapter):
    """fastdiff.AutoencoderKL called as diffusers' AutoencoderKL (encode -> latent_dist, decode)."""

    diffusers_class = "AutoencoderKL"

    @classmethod
    def from_diffusers(cls, vae, compute_dtype: torch.dtype) -> "DiffusersVAE":
        if getattr(vae, "use_tiling", False):
            raise UnsupportedError("pipe.vae: tiled decoding (pipe.vae.enable_tiling) is not supported by fastdiff.accelerate")
        _check_processors(vae, "pipe.vae")
        adapter = cls(_build(AutoencoderKL, vae, compute_dtype, "pipe.vae"), vae.config, vae.dtype, vae.attn_processors)
        adapter.use_slicing = getattr(vae, "use_slicing", False)
        return adapter

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._before_upcast = None  # (interface dtype, model dtype) while diffusers has the VAE upcast

    @property
    def post_quant_conv(self):
        """diffusers' name; SDXL pipelines read its weight's dtype after upcasting the VAE."""
        return self.model.post_quant_conv

    def to(self, *args, **kwargs):
        """Device moves, and diffusers' VAE upcast: with force_upcast in the VAE config, SDXL pipelines
        in fp16/bf16 move the VAE to float32 around encoding (and fp16 ones around decoding) and back
        to their dtype after. The fastdiff VAE then computes in float32 too, and returns to its dtype
        exactly (weights widened, then narrowed back). Other dtype changes are refused."""
        dtype = torch.empty(0, dtype=self.dtype).to(*args, **kwargs).dtype
        if dtype == torch.float32 != self.dtype and self.config.get("force_upcast") and self._before_upcast is None:
            self._before_upcast = (self._interface_dtype, self.model.dtype)
            self.model.to(torch.float32)
            self._interface_dtype = torch.float32
        elif self._before_upcast is not None and dtype == self._before_upcast[0] != self.dtype:
            self._interface_dtype, model_dtype = self._before_upcast
            self.model.to(model_dtype)
            self._before_upcast = None
        return super().to(*args, **kwargs)

    def enable_slicing(self):
        """One image at a time through the decoder (less memory; same images)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, *_, **__):
        raise UnsupportedError("tiled decoding (vae.enable_tiling) is not supported by fastdiff.accelerate")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """images in [-1, 1] -> AutoencoderKLOutput(latent_dist) with diffusers' own
        DiagonalGaussianDistribution, so .sample(generator) draws the same noise as diffusers."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        mean, logvar = self.model.encode_moments(x.to(self.model.dtype))
        dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1).to(x.dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """UNSCALED latents -> DecoderOutput(sample) in z's dtype. `generator` is accepted as
        diffusers' AutoencoderKL.decode accepts it (and does not use it)."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        parts = z.split(1) if self.use_slicing else (z,)
        image = torch.cat([self.model.decode(part.to(self.model.dtype)) for part in parts]).to(z.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)


class _CallableModule(types.ModuleType):
    """`import fastdiff.accelerate` binds this module to the name `fastdiff.accelerate`, replacing
    the function the package exports lazily; calling the module calls the function, so
    fastdiff.accelerate(pipe) works whichever of the two the name holds."""

    def __call__(self, pipe, *, dtype=None, quantize=None):
        return accelerate(pipe, dtype=dtype, quantize=quantize)


sys.modules[__name__].__class__ = _CallableModule
