"""Pipeline folders: read and write the diffusers layout, plus MGIE's checkpoints.

    folder/
      model_index.json             component list (diffusers); an optional "fastdiff" entry holds
                                   sampling defaults (e.g. MobileDiffusion's one-step mode)
      unet/config.json + diffusion_pytorch_model.safetensors|.bin
                                   "_class_name": UNet2DConditionModel or MobileDiffusionUNet
      vae/                         "_class_name": AutoencoderKL, or AutoencoderTiny (TAESD)
      text_encoder/  tokenizer/  scheduler/scheduler_config.json
      text_encoder_2/  tokenizer_2/
                                   SDXL (a UNet with addition_embed_type "text_time"): the second
                                   CLIP text encoder (with projection); model_index.json's
                                   force_zeros_for_empty_prompt (diffusers' default true) is read

    mgie/unet.pt                   MGIE's UNet state_dict (replaces unet/'s weights)
    mgie/mllm.pt                   MGIE's MLLM state_dict: edit_head.*, emb (the 8 [IMG] token
                                   embeddings the edit head adds to the MLLM's states), and the
                                   LLaMA's embed_tokens / lm_head with the rows of the new tokens

Nothing here imports diffusers; pickles are read with weights_only=True.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fastdiff.models import checkpoint
from fastdiff.requests import Defaults, PipelineError

# MGIE's [IMG] tokens: the MLLM writes them, their hidden states condition the edit
IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(8))


def is_editor(unet, vae) -> bool:
    """An InstructPix2Pix-style UNet: it takes the noisy latents and the source image's, side by side."""
    return unet.config.in_channels == 2 * vae.config.latent_channels


def is_sdxl(unet) -> bool:
    """An SDXL UNet: conditioned also on a pooled text embedding and size/crop ids (diffusers' "text_time")."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _read_json(path: Path, what: str, field: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError("folder", f"{what} missing: no {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(field, f"{path}: cannot read {what} ({exc})") from None


def _require_dir(folder: Path, name: str) -> Path:
    if not (folder / name).is_dir():
        raise PipelineError("folder", f"the {name}/ part is missing from {folder} (a diffusers pipeline folder has "
                            f"model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return folder / name


def load_unet(folder: Path, *, dtype: torch.dtype, device=None):
    """unet/ of a pipeline folder: an SD-family UNet2DConditionModel or a MobileDiffusionUNet."""
    config = _read_json(folder / "config.json", "the UNet config", "unet")
    if config.get("_class_name") == "MobileDiffusionUNet":
        from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

        fields = {f.name for f in dataclasses.fields(MobileDiffusionConfig)}
        unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
        if unknown:
            raise PipelineError("unet", f"{folder / 'config.json'}: fields unknown to MobileDiffusionConfig: {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        with torch.device("meta"):
            unet = MobileDiffusionUNet(MobileDiffusionConfig(**values))
        state_dict = checkpoint.read_state_dict(checkpoint.find_weights(folder))
        state_dict = checkpoint.match_state_dict(state_dict, unet.state_dict(), owner="MobileDiffusionUNet")
        unet.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, assign=True)
        return unet.eval(), config.get("sample_size", unet.config.sample_size)
    if config.get("time_cond_proj_dim") is not None:
        # UNet2DCondition runs it (timestep_cond), but a Pipeline has neither LCM's sampler nor its
        # guidance embedding: its images would be silently wrong
        raise ValueError(f"an LCM UNet (time_cond_proj_dim={config['time_cond_proj_dim']}) is not run by fastdiff's "
                         f"Pipeline (no LCMScheduler, no guidance embedding); use diffusers' "
                         f"LatentConsistencyModelPipeline with fastdiff.accelerate(pipe)")
    from fastdiff.models.unet_2d_condition import UNet2DCondition

    return UNet2DCondition.from_diffusers(folder, dtype=dtype, device=device), config.get("sample_size", 64)


def _load_part(field: str, load, what: str = ""):
    """load() with its errors (bad config, missing or misshapen weights) as PipelineError naming the
    part (`field`, and `what` of it)."""
    try:
        return load()
    except PipelineError:
        raise
    except Exception as exc:  # CheckpointError, bad config fields, safetensors and pickle errors, ...
        raise PipelineError(field, f"{what}{': ' if what else ''}cannot load ({exc})") from exc


def _own_aligned_memory(module) -> None:
    """Weights read from a safetensors file are views into one buffer at arbitrary offsets. MKL's
    GEMMs take other code paths on unaligned data (1-ulp different results from the same model
    built in memory, and slower): give each such tensor its own (64-byte aligned) allocation."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def _vae_folder(folder: Path, vae) -> Path:
    """The VAE folder for from_pretrained's `vae`: None (the folder's vae/), "tiny" (vae/ must hold
    an AutoencoderTiny: nothing is downloaded) or a diffusers VAE folder replacing vae/."""
    if vae is None:
        return _require_dir(folder, "vae")
    if vae == "tiny":
        own = folder / "vae" / "config.json"
        if own.is_file() and _read_json(own, "the VAE config", "vae").get("_class_name") == "AutoencoderTiny":
            return folder / "vae"
        raise PipelineError("vae", f"vae='tiny': {folder / 'vae'} holds no AutoencoderTiny and nothing is downloaded; "
                            f"pass vae=DIR, a diffusers AutoencoderTiny folder (TAESD: config.json + weights, e.g. a local "
                            f"copy of madebyollin/taesd for SD1.x/2.x latents)")
    if not Path(vae).is_dir():
        raise PipelineError("vae", f"expected None, 'tiny' or a diffusers VAE folder, got {vae!r} (no such directory)")
    return Path(vae)


def load_vae(folder: Path, *, dtype: torch.dtype, device=None, upcast_fp16: bool = False):
    """A diffusers VAE folder (or a pipeline folder's vae/): AutoencoderTiny or AutoencoderKL, by its config's _class_name.
    upcast_fp16: a KL VAE whose config says force_upcast (diffusers' default) is kept in float32 when
    `dtype` is float16, as diffusers' SDXL pipelines run it (SDXL's VAE overflows in float16)."""
    config = _read_json(checkpoint.resolve_model_folder(folder, "vae") / "config.json", "the VAE config", "vae")
    if config.get("_class_name") == "AutoencoderTiny":
        from fastdiff.models.autoencoder_tiny import AutoencoderTiny

        return AutoencoderTiny.from_diffusers(folder, dtype=dtype, device=device)
    from fastdiff.models.vae import AutoencoderKL

    if upcast_fp16 and dtype == torch.float16 and config.get("force_upcast", True):
        dtype = torch.float32
    return AutoencoderKL.from_diffusers(folder, dtype=dtype, device=device)


def _load_text_encoder(folder: Path, sdxl: bool, *, dtype: torch.dtype, device=None):
    """The folder's text encoder (SDXL: both), or None when it has none (embeddings only)."""
    from fastdiff.models.text_encoder import CLIPTextEncoder, SDXLTextEncoders

    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    if not any((folder / part).is_dir() for part in encoders):
        return None
    if not sdxl:
        _require_dir(folder, "tokenizer")
        encoder = _load_part("text_encoder", lambda: CLIPTextEncoder.from_pretrained(folder, dtype=dtype, device=device))
        _own_aligned_memory(encoder.model)
        return encoder
    for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not (folder / part).is_dir():
            raise PipelineError("folder", f"the {part}/ part is missing from {folder} (an SDXL folder has text_encoder/, "
                                f"tokenizer/, text_encoder_2/ and tokenizer_2/; a refiner's, with text_encoder_2/ only, "
                                f"is image-to-image, which Pipeline does not run)")
    encoders = _load_part("text_encoder", lambda: SDXLTextEncoders.from_pretrained(folder, dtype=dtype, device=device))
    _own_aligned_memory(encoders.first.model)
    _own_aligned_memory(encoders.second.model)
    return encoders


def load_pipeline_parts(folder: Path, *, dtype: torch.dtype, device=None, mgie=None, vae=None) -> dict:
    """The keyword arguments of Pipeline(...) for a pipeline folder (see the module docstring); every
    part is loaded in `dtype` (resolved by the caller: requests.resolve_dtype; an SDXL VAE upcast from
    float16, see load_vae). vae: see _vae_folder."""
    if not folder.is_dir():
        raise PipelineError("folder", f"no directory at {folder}")
    index = _read_json(folder / "model_index.json", "model_index.json (the pipeline's component list)", "folder")
    scheduler_config = _read_json(_require_dir(folder, "scheduler") / "scheduler_config.json", "the scheduler config",
                                  "scheduler")
    unet_folder, vae_folder = _require_dir(folder, "unet"), _vae_folder(folder, vae)
    unet, sample_size = _load_part("unet", lambda: load_unet(unet_folder, dtype=dtype, device=device))
    sdxl = is_sdxl(unet)
    vae = _load_part("vae", lambda: load_vae(vae_folder, dtype=dtype, device=device, upcast_fp16=sdxl))
    if is_editor(unet, vae) and type(vae).__name__ == "AutoencoderTiny":
        # InstructPix2Pix-style UNets take the KL VAE's unscaled image latents; TAESD's are scaled
        raise PipelineError("vae", "an editor UNet needs the KL VAE's image latents; an AutoencoderTiny (TAESD) cannot encode them")
    text_encoder = _load_text_encoder(folder, sdxl, dtype=dtype, device=device)
    for model in (unet, vae):
        _own_aligned_memory(model)
    parts = dict(unet=unet, vae=vae, scheduler_config=scheduler_config, text_encoder=text_encoder, name=folder.name)
    if sdxl:
        parts["force_zeros_for_empty_prompt"] = index.get("force_zeros_for_empty_prompt", True)
    stored = index.get("fastdiff", {}).get("defaults", {})
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(Defaults)})
    if unknown:
        raise PipelineError("folder", f"{folder / 'model_index.json'}: unknown fastdiff defaults {unknown}")
    parts["defaults"] = Defaults.for_model(editor=is_editor(unet, vae), sdxl=sdxl,
                                           **{"size": sample_size * vae.config.downscale, **stored})
    if mgie is not None:
        mgie_parts, _ = load_mgie(Path(mgie), unet, dtype=dtype, device=device)
        parts.update(mgie_parts)
    return parts


def load_mgie(folder: Path, unet, *, dtype: torch.dtype, device=None, field: str = "mgie") -> tuple[dict, dict]:
    """MGIE's unet.pt (into `unet`) and mllm.pt, each read once: (the Pipeline arguments edit_head
    and img_token_embeddings, mllm.pt's other tensors: the MLLM's rows for its new tokens).
    The [IMG] token embeddings are mllm.pt's `emb`, as MGIE's inference passes them to the edit head
    (apple/ml-mgie: `emb = ckpt["emb"]`; `edit_head(hidden, emb)`). Errors name `field`, the
    caller's argument for the folder."""
    from fastdiff.models.edit_head import EditHead

    for name in ("unet.pt", "mllm.pt"):
        if not (folder / name).is_file():
            raise PipelineError(field, f"{name} missing from {folder} (MGIE's checkpoint folder holds unet.pt and mllm.pt)")
    _load_part(field, lambda: unet.load_state_dict(checkpoint.read_state_dict(folder / "unet.pt")), "unet.pt")
    mllm = _load_part(field, lambda: checkpoint.read_state_dict(folder / "mllm.pt"), "mllm.pt")
    emb = mllm.pop("emb", None)
    if emb is None:
        raise PipelineError(field, f"{folder / 'mllm.pt'} has no 'emb' (MGIE's [IMG] token embeddings, added to the "
                                   f"MLLM states by the edit head); keys start {sorted(mllm)[:6]}")
    head_state = {k: mllm.pop(k) for k in [k for k in mllm if k.startswith("edit_head.")]}
    edit_head = _load_part(field, lambda: EditHead.from_mgie(head_state, dtype=dtype, device=device), "mllm.pt edit head")
    width = edit_head.llm2hid.in_features
    if emb.numel() != len(IMG_TOKENS) * width:
        raise PipelineError(field, f"emb in {folder / 'mllm.pt'} is {tuple(emb.shape)}; expected ({len(IMG_TOKENS)}, "
                                   f"{width}): one row per [IMG] token, as wide as the edit head's input")
    _own_aligned_memory(unet)
    _own_aligned_memory(edit_head)
    img_embeddings = emb.reshape(len(IMG_TOKENS), width).to(device=device, dtype=dtype)
    return dict(edit_head=edit_head, img_token_embeddings=img_embeddings), mllm


def _save_model(model, folder: Path, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{checkpoint.WEIGHTS_NAME}.safetensors"))


def save_pipeline(pipe, folder) -> None:
    """Write `pipe` as a diffusers-layout folder that Pipeline.from_pretrained reads back to the same
    outputs (its UNet included: an MGIE pipeline's UNet is written with MGIE's weights; its edit
    head is not, so pass the mgie/ folder again for img_hidden_states)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet_class = "MobileDiffusionUNet" if type(pipe.unet).__name__ == "MobileDiffusionUNet" else "UNet2DConditionModel"
    unet_config = {"_class_name": unet_class, **dataclasses.asdict(pipe.unet.config)}
    unet_config.setdefault("sample_size", pipe.defaults.size // pipe.vae_scale)
    _save_model(pipe.unet, folder / "unet", unet_config)
    vae_class = type(pipe.vae).__name__  # AutoencoderKL or AutoencoderTiny: diffusers' class names
    _save_model(pipe.vae, folder / "vae", {"_class_name": vae_class, **dataclasses.asdict(pipe.vae.config)})
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipe.scheduler_config, indent=2))
    kind = "StableDiffusionInstructPix2PixPipeline" if pipe.is_editor else "StableDiffusionPipeline"
    index = {"_class_name": "StableDiffusionXLPipeline" if pipe.is_sdxl else kind,
             "unet": ["fastdiff" if unet_class == "MobileDiffusionUNet" else "diffusers", unet_class],
             "vae": ["diffusers", vae_class], "scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "")],
             "fastdiff": {"defaults": dataclasses.asdict(pipe.defaults)}}
    if pipe.is_sdxl:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    if pipe.text_encoder is not None:
        index.update(pipe.text_encoder.save_pretrained(folder))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
