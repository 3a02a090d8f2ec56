"""Pipeline folders: read and write the diffusers layout, plus MGIE's checkpoints.

    folder/
      model_index.json             component list (diffusers); an optional "fastdiff" entry holds
                                   sampling defaults (e.g. MobileDiffusion's one-step mode)
      unet/config.json + diffusion_pytorch_model.safetensors|.bin
                                   "_class_name": UNet2DConditionModel or MobileDiffusionUNet
      vae/                         "_class_name": AutoencoderKL, or AutoencoderTiny (TAESD)
      text_encoder/  tokenizer/  scheduler/scheduler_config.json

    mgie/unet.pt                   MGIE's UNet state_dict (replaces unet/'s weights)
    mgie/mllm.pt                   MGIE's MLLM state_dict: its edit_head.* and embed_tokens (the
                                   last 8 rows are the [IMG] token embeddings)

Nothing here imports diffusers; pickles are read with weights_only=True.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fastdiff.models import checkpoint
from fastdiff.requests import Defaults, PipelineError

MGIE_IMG_TOKENS = 8


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"folder: {what} missing: no {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read {what} ({exc})") from None


def _require_dir(folder: Path, name: str) -> Path:
    if not (folder / name).is_dir():
        raise PipelineError(f"folder: the {name}/ part is missing from {folder} (a diffusers pipeline folder has "
                            f"model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return folder / name


def load_unet(folder: Path, *, dtype: torch.dtype, device=None):
    """unet/ of a pipeline folder: an SD-family UNet2DConditionModel or a MobileDiffusionUNet."""
    config = _read_json(folder / "config.json", "the UNet config")
    if config.get("_class_name") == "MobileDiffusionUNet":
        from fastdiff.models.mobilediffusion import MobileDiffusionConfig, MobileDiffusionUNet

        fields = {f.name for f in dataclasses.fields(MobileDiffusionConfig)}
        unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
        if unknown:
            raise PipelineError(f"{folder / 'config.json'}: fields unknown to MobileDiffusionConfig: {unknown}")
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


def _load_part(name: str, load):
    """load() with its errors (bad config, missing or misshapen weights) as PipelineError naming the part."""
    try:
        return load()
    except PipelineError:
        raise
    except Exception as exc:  # CheckpointError, bad config fields, safetensors and pickle errors, ...
        raise PipelineError(f"{name}: cannot load ({exc})") from exc


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
        if own.is_file() and _read_json(own, "the VAE config").get("_class_name") == "AutoencoderTiny":
            return folder / "vae"
        raise PipelineError(f"vae='tiny': {folder / 'vae'} holds no AutoencoderTiny and nothing is downloaded; pass "
                            f"vae=DIR, a diffusers AutoencoderTiny folder (TAESD: config.json + weights, e.g. a local "
                            f"copy of madebyollin/taesd for SD1.x/2.x latents)")
    if not Path(vae).is_dir():
        raise PipelineError(f"vae: expected None, 'tiny' or a diffusers VAE folder, got {vae!r} (no such directory)")
    return Path(vae)


def load_vae(folder: Path, *, dtype: torch.dtype, device=None):
    """A diffusers VAE folder (or a pipeline folder's vae/): AutoencoderTiny or AutoencoderKL, by its config's _class_name."""
    config = _read_json(checkpoint.resolve_model_folder(folder, "vae") / "config.json", "the VAE config")
    if config.get("_class_name") == "AutoencoderTiny":
        from fastdiff.models.autoencoder_tiny import AutoencoderTiny

        return AutoencoderTiny.from_diffusers(folder, dtype=dtype, device=device)
    from fastdiff.models.vae import AutoencoderKL

    return AutoencoderKL.from_diffusers(folder, dtype=dtype, device=device)


def load_pipeline_parts(folder: Path, *, dtype: torch.dtype, device=None, mgie=None, vae=None) -> dict:
    """The keyword arguments of Pipeline(...) for a pipeline folder (see the module docstring); every
    part is loaded in `dtype` (resolved by the caller: requests.resolve_dtype). vae: see _vae_folder."""
    from fastdiff.models.text_encoder import CLIPTextEncoder

    if not folder.is_dir():
        raise PipelineError(f"folder: no directory at {folder}")
    index = _read_json(folder / "model_index.json", "model_index.json (the pipeline's component list)")
    scheduler_config = _read_json(_require_dir(folder, "scheduler") / "scheduler_config.json", "the scheduler config")
    unet_folder, vae_folder = _require_dir(folder, "unet"), _vae_folder(folder, vae)
    unet, sample_size = _load_part("unet", lambda: load_unet(unet_folder, dtype=dtype, device=device))
    vae = _load_part("vae", lambda: load_vae(vae_folder, dtype=dtype, device=device))
    if unet.config.in_channels == 2 * vae.config.latent_channels and type(vae).__name__ == "AutoencoderTiny":
        # InstructPix2Pix-style UNets take the KL VAE's unscaled image latents; TAESD's are scaled
        raise PipelineError("vae: an editor UNet needs the KL VAE's image latents; an AutoencoderTiny (TAESD) cannot encode them")
    text_encoder = None
    if (folder / "text_encoder").is_dir():
        _require_dir(folder, "tokenizer")
        text_encoder = _load_part("text_encoder", lambda: CLIPTextEncoder.from_pretrained(folder, dtype=dtype, device=device))
    for model in (unet, vae, text_encoder.model if text_encoder is not None else None):
        if model is not None:
            _own_aligned_memory(model)
    parts = dict(unet=unet, vae=vae, scheduler_config=scheduler_config, text_encoder=text_encoder, name=folder.name)
    stored = index.get("fastdiff", {}).get("defaults", {})
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(Defaults)})
    if unknown:
        raise PipelineError(f"{folder / 'model_index.json'}: unknown fastdiff defaults {unknown}")
    editor = unet.config.in_channels == 2 * vae.config.latent_channels
    parts["defaults"] = Defaults(**{"steps": 100 if editor else 50, "size": sample_size * vae.config.downscale, **stored})
    if mgie is not None:
        parts.update(load_mgie(Path(mgie), unet, dtype=dtype, device=device))
    return parts


def load_mgie(folder: Path, unet, *, dtype: torch.dtype, device=None) -> dict:
    """MGIE's unet.pt (into `unet`) and mllm.pt (edit head + [IMG] token embeddings)."""
    from fastdiff.models.edit_head import EditHead

    for name in ("unet.pt", "mllm.pt"):
        if not (folder / name).is_file():
            raise PipelineError(f"mgie: {name} missing from {folder} (MGIE's checkpoint folder holds unet.pt and mllm.pt)")
    _load_part("mgie: unet.pt", lambda: unet.load_state_dict(checkpoint.read_state_dict(folder / "unet.pt")))
    mllm = _load_part("mgie: mllm.pt", lambda: checkpoint.read_state_dict(folder / "mllm.pt"))
    embedding_keys = [k for k in mllm if k.endswith("embed_tokens.weight")]
    if len(embedding_keys) != 1:
        raise PipelineError(f"mgie: expected one '...embed_tokens.weight' in mllm.pt (the [IMG] token embeddings are its "
                            f"last {MGIE_IMG_TOKENS} rows), found {embedding_keys or 'none'}")
    img_embeddings = mllm[embedding_keys[0]][-MGIE_IMG_TOKENS:].to(device=device, dtype=dtype)
    edit_head = _load_part("mgie: mllm.pt edit head", lambda: EditHead.from_mgie(mllm, dtype=dtype, device=device))
    _own_aligned_memory(unet)
    _own_aligned_memory(edit_head)
    if edit_head.llm2hid.in_features != img_embeddings.shape[-1]:
        raise PipelineError(f"mgie: the edit head takes {edit_head.llm2hid.in_features}-wide states but embed_tokens rows "
                            f"are {img_embeddings.shape[-1]} wide")
    return dict(edit_head=edit_head, img_token_embeddings=img_embeddings)


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
    index = {"_class_name": "StableDiffusionInstructPix2PixPipeline" if pipe.is_editor else "StableDiffusionPipeline",
             "unet": ["fastdiff" if unet_class == "MobileDiffusionUNet" else "diffusers", unet_class],
             "vae": ["diffusers", vae_class], "scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "")],
             "fastdiff": {"defaults": dataclasses.asdict(pipe.defaults)}}
    if pipe.text_encoder is not None:
        pipe.text_encoder.model.save_pretrained(str(folder / "text_encoder"))
        pipe.text_encoder.tokenizer.save_pretrained(str(folder / "tokenizer"))
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
