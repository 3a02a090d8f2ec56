"""CLIP text encoders for the SD-family pipelines, through transformers (CLIPTextModel + CLIPTokenizer).

Encodes prompts the way diffusers' StableDiffusion / InstructPix2Pix pipelines do: tokens padded
(with the tokenizer's pad token) and truncated to max_length (77) with a warning naming the
dropped text, no attention mask (CLIP's
causal mask already keeps padding out of the real tokens), output = last_hidden_state
(B, 77, hidden): 768 for SD1.5's ViT-L/14. SDXLTextEncoders: SDXL's two, as
StableDiffusionXLPipeline.encode_prompt uses them.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["CLIPTextEncoder", "SDXLTextEncoders", "write_clip_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """CLIP's byte alphabet (GPT-2's byte-to-unicode table): printable bytes stand for themselves,
    the other 68 map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (most frequent pair first, ties by the pair's text) until every word is one
    symbol; a word's last character carries CLIP's end-of-word mark."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in words if w]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: (counts[pair], pair))
        merges.append(best)
        for symbols in corpus:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [best[0] + best[1]]
                i += 1


def write_clip_tokenizer(folder: str | os.PathLike, words: list[str] = (), *, max_length: int = 77) -> int:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) over CLIP's byte
    alphabet plus the merges that make each of `words` (lowercase ASCII) one token; any other text
    still tokenizes, character by character. Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = _learn_merges(sorted(set(words)))
    tokens = [*symbols, *(s + "</w>" for s in symbols), *dict.fromkeys(a + b for a, b in merges), BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length}))
    return len(tokens)


def _component(folder: Path, name: str) -> Path:
    """`folder/name` in a pipeline folder, or `folder` itself when it is that component."""
    return folder / name if (folder / name).is_dir() else folder


class CLIPTextEncoder:
    """prompts -> (B, max_length, hidden) conditioning. Holds a transformers CLIPTextModel and CLIPTokenizer."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # a fast tokenizer sets padding/truncation on its shared Rust backend for every call:
        # concurrent calls (pipelines used from several threads) would see each other's settings
        self._tokenizer_lock = threading.Lock()
        # Tokenizers saved without model_max_length report a huge sentinel: use the position table's size.
        limit = model.config.max_position_embeddings
        self.max_length = max_length or (tokenizer.model_max_length if tokenizer.model_max_length <= limit else limit)
        if not 1 <= self.max_length <= limit:
            raise ValueError(f"max_length: expected 1..{limit} (the model's position embeddings), got {self.max_length}")

    def __getstate__(self):  # copies and pickles get their own lock
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, max_length: int | None = None,
                        parts: tuple[str, str] = ("text_encoder", "tokenizer"),
                        with_projection: bool = False) -> "CLIPTextEncoder":
        """Load from a pipeline folder (its text_encoder/ and tokenizer/, or the `parts` named), local
        files only. with_projection: a CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder: no directory at {folder}")
        from transformers.utils import logging as transformers_logging

        model_part, tokenizer_part = parts
        tokenizer = CLIPTokenizer.from_pretrained(str(_component(folder, tokenizer_part)), local_files_only=True)
        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per pipeline load is noise here
        try:
            model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            model = model_class.from_pretrained(str(_component(folder, model_part)), local_files_only=True,
                                                dtype=dtype or torch.float32)
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        return cls(model.to(device), tokenizer, max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> dict:
        """Write text_encoder/ and tokenizer/ into a pipeline folder; returns their model_index.json entries."""
        self.model.save_pretrained(str(Path(folder) / "text_encoder"))
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))
        return dict(text_encoder=["transformers", type(self.model).__name__], tokenizer=["transformers", "CLIPTokenizer"])

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: str | list[str], *, warn: bool = True) -> torch.Tensor:
        """(B, max_length) token ids: <bos> prompt <eos> then padding, truncated to max_length (with a
        warning naming what was dropped, unless `warn` is False)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a string or a non-empty list of strings, got {prompts!r}")
        with self._tokenizer_lock:
            ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids
            if warn:
                self._warn_truncated(prompts)
        return ids

    def _warn_truncated(self, prompts) -> None:
        """Warn, as diffusers' pipelines do, naming the tokens dropped from each prompt that does
        not fit: the text between max_length - 1 kept tokens and the final <eos>."""
        for prompt in prompts:
            full = self.tokenizer(prompt, truncation=False).input_ids  # <bos> ... <eos>, unpadded
            if len(full) > self.max_length:
                removed = self.tokenizer.decode(full[self.max_length - 1:-1])
                warnings.warn(f"The following part of your input was truncated because CLIP can only handle sequences "
                              f"up to {self.max_length} tokens: {removed!r}", UserWarning, stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, max_length, hidden) last hidden state, in the model's dtype and device."""
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(ids).last_hidden_state


class SDXLTextEncoders:
    """SDXL's two CLIP text encoders: prompts -> (context (B, L, D1 + D2), pooled (B, P)), as diffusers'
    StableDiffusionXLPipeline.encode_prompt computes them: each encoder's penultimate hidden states
    (SDXL conditions on the layer before the last, without the final layer norm), side by side;
    pooled: the second's (a CLIPTextModelWithProjection) projected text embedding. SDXL base: 768 +
    1280 = 2048 wide, pooled 1280."""

    def __init__(self, first: CLIPTextEncoder, second: CLIPTextEncoder):
        if not hasattr(second.model, "text_projection"):
            raise ValueError(f"text_encoder_2: expected a CLIPTextModelWithProjection (its projected text embedding is "
                             f"SDXL's pooled conditioning), got {type(second.model).__name__}")
        if first.max_length != second.max_length:
            raise ValueError(f"tokenizer_2: max_length {second.max_length} differs from tokenizer's {first.max_length} "
                             f"(the two encoders' states are joined token by token)")
        self.first, self.second = first, second

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "SDXLTextEncoders":
        """Load text_encoder/ + tokenizer/ and text_encoder_2/ + tokenizer_2/ of an SDXL pipeline folder."""
        load = dict(dtype=dtype, device=device)
        return cls(CLIPTextEncoder.from_pretrained(folder, **load),
                   CLIPTextEncoder.from_pretrained(folder, parts=("text_encoder_2", "tokenizer_2"), with_projection=True,
                                                   **load))

    def save_pretrained(self, folder: str | os.PathLike) -> dict:
        """Write the four parts into a pipeline folder; returns their model_index.json entries."""
        entries = self.first.save_pretrained(folder)
        self.second.model.save_pretrained(str(Path(folder) / "text_encoder_2"))
        self.second.tokenizer.save_pretrained(str(Path(folder) / "tokenizer_2"))
        return dict(entries, text_encoder_2=["transformers", type(self.second.model).__name__],
                    tokenizer_2=["transformers", "CLIPTokenizer"])

    @property
    def hidden_size(self) -> int:
        return self.first.hidden_size + self.second.hidden_size

    @property
    def pooled_size(self) -> int:
        return self.second.model.config.projection_dim

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, max_length, hidden_size), pooled (B, pooled_size)), in the models' dtype and device."""
        states = []
        for encoder in (self.first, self.second):
            ids = encoder.tokenize(prompts, warn=encoder is self.first).to(encoder.model.device)  # one warning per prompt
            output = encoder.model(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), output.text_embeds
