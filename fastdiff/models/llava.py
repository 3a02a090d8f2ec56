"""LLaVA-v1, the multimodal LLM inside MGIE, on transformers' own LlamaForCausalLM and CLIPVisionModel.

    features = vision(pixels).hidden_states[select_layer][:, 1:]   (1, 3, S, S) -> (1, N, C): patch tokens, no CLS
    image    = mm_projector(features)                               (1, N, C) -> (1, N, W): one linear layer
    embeds   = embed_tokens(ids), the <im_patch> rows replaced by `image`        (1, L, W)
    greedy decoding from `embeds`, keeping the last layer's (final-normed) hidden states

A LLaVA-v1 folder (config.json with "model_type": "llava", LlavaLlamaForCausalLM) is read as it is
on disk: the config as a LLaMA config plus LLaVA's mm_* fields, the weights from pytorch_model-*.bin
shards (torch.load(weights_only=True, mmap=True)) or safetensors under their own names
(model.layers.*, lm_head.*, model.mm_projector.*). The model is built on the meta device and each
tensor is cast once into its place, so a 7B checkpoint never exists twice in memory. The vision
tower is not taken from the LLaVA folder: as in MGIE, it is CLIPVisionModel loaded from the folder
that mm_vision_tower names (or vision_dir). Being transformers' model, it runs on torch's own
products (the projector too), not on fastdiff.ops.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from fastdiff.models.checkpoint import LISTED, CheckpointError, load_torch_file

__all__ = ["LlavaV1", "read_llava_config", "llava_weight_files", "read_weights", "IMAGE_PATCH", "IMAGE_START", "IMAGE_END"]

IMAGE_PATCH, IMAGE_START, IMAGE_END = "<im_patch>", "<im_start>", "<im_end>"
PROJECTOR = "model.mm_projector."
# LLaVA checkpoints may carry their own copy of the vision tower; MGIE replaces it with the tower
# loaded from mm_vision_tower, and so does this loader: these keys are known and skipped.
VISION_TOWER = "model.vision_tower."
# config fields that are LLaVA's, not LLaMA's, or describe the file rather than the model
_NOT_LLAMA = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def read_llava_config(folder: Path) -> tuple[dict, dict]:
    """(LLaMA fields, LLaVA mm_* fields) of a LLaVA-v1 config.json."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError("llava_dir", f"no config.json in {folder} (a LLaVA-v1 folder holds config.json, the "
                              f"tokenizer and pytorch_model-*.bin)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError("llava_dir", f"cannot read {path} ({exc})") from None
    if config.get("model_type") not in ("llava", "llama"):
        raise CheckpointError("llava_dir", f"{path} has model_type {config.get('model_type')!r}; expected LLaVA-v1's "
                              f"'llava' (LlavaLlamaForCausalLM)")
    mm = {k: v for k, v in config.items() if k.startswith("mm_")}
    if "mm_vision_tower" not in mm:
        raise CheckpointError("llava_dir", f"{path} has no mm_vision_tower: not a LLaVA model")
    llama = {k: v for k, v in config.items() if k not in mm and k not in _NOT_LLAMA}
    if "max_position_embeddings" not in llama and "max_sequence_length" in llama:  # LLaMA-v1 era name
        llama["max_position_embeddings"] = llama.pop("max_sequence_length")
    return llama, mm


def llava_weight_files(folder: Path) -> list[Path]:
    """The weight shards of a LLaVA folder: safetensors if present, else pytorch_model*.bin."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError("llava_dir", f"no model*.safetensors or pytorch_model*.bin in {folder}")


def read_weights(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """name -> (shape, read) for a weight file, without reading any tensor yet: pickles are opened
    memory-mapped with weights_only=True, safetensors through safe_open slices."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")  # stays open while a slice refers to it
            slices = {k: handle.get_slice(k) for k in handle.keys()}
        except Exception as exc:  # a bad header: safetensors' message does not name the file
            raise CheckpointError(None, f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
        return {k: (tuple(s.get_shape()), lambda s=s: s[:]) for k, s in slices.items()}
    state = load_torch_file(path, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(None, f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return {k: (tuple(v.shape), lambda v=v: v) for k, v in state.items()}


def _listing(kind: str, names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - LISTED} more)" if len(names) > LISTED else ""
    return f"{len(names)} {kind}: {', '.join(names[:LISTED])}{more}"


class LlavaV1(nn.Module):
    """llm: LlamaForCausalLM; vision: CLIPVisionModel; mm_projector: Linear(vision width C, LLM width W)."""

    def __init__(self, llm, vision, mm_projector: nn.Linear, *, select_layer: int, patch_token_id: int):
        super().__init__()
        self.llm, self.vision, self.mm_projector = llm, vision, mm_projector
        self.select_layer, self.patch_token_id = select_layer, patch_token_id

    @classmethod
    def from_pretrained(cls, folder: Path, vision, *, vocab_size: int, patch_token_id: int,
                        overrides: dict[str, torch.Tensor], dtype: torch.dtype, device=None) -> "LlavaV1":
        """The LLaVA-v1 model of `folder` with its vocabulary grown to `vocab_size`; `overrides` are
        tensors loaded on top, non-strictly (MGIE's mllm.pt: full embed_tokens / lm_head with the
        new rows, which must cover every row the LLaVA weights lack; names of neither the LLM nor
        the projector are ignored). `vision`: the CLIPVisionModel to use."""
        from transformers import LlamaConfig, LlamaForCausalLM

        llama_fields, mm = read_llava_config(folder)
        config = LlamaConfig(**{**llama_fields, "vocab_size": vocab_size})
        with torch.device("meta"):
            llm = LlamaForCausalLM(config).to(dtype)
        expected = llm.state_dict()
        # every key is checked before any tensor is read (the shards are memory-mapped): a folder
        # that does not fit fails in seconds, not after minutes of loading
        sources = {name: stored for path in llava_weight_files(folder) for name, stored in read_weights(path).items()}
        projector = {k[len(PROJECTOR):]: read() for k, (_, read) in sources.items() if k.startswith(PROJECTOR)}
        projector.update({k[len(PROJECTOR):]: v for k, v in overrides.items() if k.startswith(PROJECTOR)})
        sources = {k: v for k, v in sources.items() if not k.startswith((PROJECTOR, VISION_TOWER)) and k not in overrides}
        sources.update({k: (tuple(v.shape), lambda v=v: v) for k, v in overrides.items() if k in expected})
        missing = [k for k in expected if k not in sources]
        unexpected = [k for k in sources if k not in expected]
        misshapen = [f"{k} (checkpoint {shape}, model {tuple(expected[k].shape)})"
                     for k, (shape, _) in sources.items() if k in expected and shape != tuple(expected[k].shape)]
        problems = [_listing(kind, names) for kind, names in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen)) if names]
        if problems:
            raise CheckpointError("llava_dir", f"the weights in {folder} do not fit LLaMA {config.num_hidden_layers} "
                                  f"layers x {config.hidden_size}: " + "; ".join(problems))
        width = vision.config.hidden_size
        if {"weight", "bias"} - set(projector):
            raise CheckpointError("llava_dir", f"no {PROJECTOR}weight/bias in the weights of {folder} (LLaVA-v1 keeps its "
                                  f"linear image projector there; found {sorted(projector) or 'none'})")
        if projector["weight"].shape != (config.hidden_size, width):
            raise CheckpointError("llava_dir", f"{PROJECTOR}weight is {tuple(projector['weight'].shape)}, expected "
                                  f"({config.hidden_size}, {width}) from the LLM and vision widths")
        for name in list(sources):  # one cast per tensor, straight into the module: no second copy of the model
            tensor = sources.pop(name)[1]().to(device=device, dtype=dtype, copy=True)
            llm.load_state_dict({name: tensor}, strict=False, assign=True)
        mm_projector = nn.Linear(width, config.hidden_size, device=device, dtype=dtype)
        mm_projector.load_state_dict(projector)
        # non-persistent buffers (the rotary frequencies) are not in any checkpoint: compute them for real
        with torch.device(device or "cpu"):
            llm.model.rotary_emb = type(llm.model.rotary_emb)(config=config)
        leftover = [n for n, t in (*llm.named_parameters(), *llm.named_buffers()) if t.is_meta]
        if leftover:
            raise CheckpointError("llava_dir", f"tensors left without values: {leftover[:LISTED]}")
        return cls(llm.eval(), vision.eval(), mm_projector.eval(), select_layer=mm.get("mm_vision_select_layer", -1),
                   patch_token_id=patch_token_id)

    @property
    def width(self) -> int:
        return self.llm.config.hidden_size

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """ids: (1, L) prompt ids with N <im_patch> tokens; pixels: (1, 3, S, S) -> (1, L, W) input embeddings."""
        states = self.vision(pixels.to(self.vision.dtype), output_hidden_states=True).hidden_states
        features = states[self.select_layer][:, 1:]  # (1, N, C): patch tokens, CLS dropped
        image = self.mm_projector(features.to(self.mm_projector.weight.dtype))  # (1, N, W)
        embeds = self.llm.get_input_embeddings()(ids)  # (1, L, W)
        slots = ids[0] == self.patch_token_id
        if int(slots.sum()) != image.shape[1]:
            raise ValueError(f"ids: {int(slots.sum())} {IMAGE_PATCH} tokens for {image.shape[1]} image patches")
        embeds[0, slots] = image[0].to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def greedy(self, ids: list[int], embeds: torch.Tensor, *, max_new_tokens: int, no_repeat_ngram_size: int,
               eos_token_id: int | None, timings: dict | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy decoding as transformers' generate(do_sample=False, num_beams=1, no_repeat_ngram_size)
        with input_ids=ids (the n-gram ban sees the prompt's ids) and inputs_embeds=embeds.
        Returns (generated ids, hidden): hidden (L + n - 1, W) holds the last layer's states at every
        position that was run (the last generated token is never fed back), as generate's hidden_states.
        Only the newest position goes through lm_head. timings (if given) gets prefill_s / decode_s."""
        from time import perf_counter

        from transformers import DynamicCache

        # the KV cache's keyword: `cache` in recent transformers, `past_key_values` before
        cache_kw = "cache" if "cache" in inspect.signature(self.llm.model.forward).parameters else "past_key_values"
        cache = {cache_kw: DynamicCache()}
        sequence, generated, hidden = list(ids), [], []
        start = perf_counter()
        out = self.llm.model(inputs_embeds=embeds, use_cache=True, **cache)
        while True:
            hidden.append(out.last_hidden_state[0])  # (positions run, W)
            logits = self.llm.lm_head(out.last_hidden_state[:, -1]).float()[0]  # (V,)
            for banned in self._ngram_bans(sequence, no_repeat_ngram_size):
                logits[banned] = -float("inf")
            token = int(logits.argmax())
            sequence.append(token)
            generated.append(token)
            if len(generated) == 1 and timings is not None:  # the first token ends the prefill
                timings["prefill_s"] = perf_counter() - start
                start = perf_counter()
            if token == eos_token_id or len(generated) == max_new_tokens:
                break
            out = self.llm.model(input_ids=torch.tensor([[token]], device=embeds.device), use_cache=True, **cache)
        if timings is not None:
            timings["decode_s"] = perf_counter() - start
        return generated, torch.cat(hidden)

    @staticmethod
    def _ngram_bans(sequence: list[int], n: int) -> set[int]:
        """Tokens that would repeat an n-gram of `sequence` (those following an earlier copy of its last n-1 tokens)."""
        if n < 1 or len(sequence) < n - 1:
            return set()
        tail = sequence[len(sequence) - n + 1:]
        return {sequence[i + n - 1] for i in range(len(sequence) - n + 1) if sequence[i:i + n - 1] == tail}
