"""MGIE's edit head (apple/ml-mgie, `EditMapper`): maps the LLM's hidden states at the 8 [IMG]
tokens to the 77 x 768 conditioning that replaces CLIP text features in the edit UNet.

    hid  = llm2hid(llm + emb)                        (B, 8, 4096) -> (B, 8, 512)
    hid  = mapper(hid, query.repeat(B, 1, 1))        nn.Transformer: 4 encoder + 4 decoder layers,
                                                     pre-norm, ReLU FFN 2048, 4 heads; the 77 learnt
                                                     queries attend to the encoded 8 tokens
    feat = hid2feat(hid)                             (B, 77, 512) -> (B, 77, 768)

Attention runs on fastdiff.ops.attention over (B, L, heads, head_dim) views of the fused input
projection, the dense products on fastdiff.ops.linear (residuals added by the GEMM); LayerNorm and
ReLU are torch's. Parameter names are torch.nn.Transformer's,
so MGIE's state_dict loads as is (`EditHead.from_mgie` finds it inside mllm.pt).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.models.checkpoint import CheckpointError, match_state_dict, read_state_dict

__all__ = ["EditHead", "extract_edit_head_state"]

EDIT_HEAD_MARKER = "edit_head."


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (in_proj_weight/bias packing q, k, v; out_proj),
    batch-first, no masks, no dropout."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: must divide embed_dim={embed_dim}, got {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, E); memory: (B, Lk, E) for cross-attention, None for self-attention;
        residual: (B, Lq, E) added to the output, or None."""
        B, Lq, E = x.shape
        H, D = self.num_heads, self.head_dim
        if memory is None:  # one GEMM for q, k, v; attention reads strided views of it
            q, k, v = ops.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, Lq, 3, H, D).unbind(2)
        else:
            q = ops.linear(x, self.in_proj_weight[:E], self.in_proj_bias[:E]).view(B, Lq, H, D)
            kv = ops.linear(memory, self.in_proj_weight[E:], self.in_proj_bias[E:])
            k, v = kv.view(B, memory.shape[1], 2, H, D).unbind(2)
        out = ops.attention(q, k, v, scale=D**-0.5)  # (B, Lq, H, D), contiguous
        # a view for the kernels (contiguous outputs)
        return ops.linear(out.reshape(B, Lq, E), self.out_proj.weight, self.out_proj.bias, residual=residual)


def _feed_forward(linear1: nn.Linear, linear2: nn.Linear, x: torch.Tensor, *, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear2(relu(linear1(x))): the layers' ReLU FFN."""
    hidden = F.relu(ops.linear(x, linear1.weight, linear1.bias))
    return ops.linear(hidden, linear2.weight, linear2.bias, residual=residual)


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer(norm_first=True, activation=relu, dropout=0)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, eps: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.norm1(x), residual=x)
        return _feed_forward(self.linear1, self.linear2, self.norm2(x), residual=x)


class DecoderLayer(nn.Module):
    """nn.TransformerDecoderLayer(norm_first=True, activation=relu, dropout=0), no masks."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, eps: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.norm1(x), residual=x)
        x = self.multihead_attn(self.norm2(x), memory, residual=x)
        return _feed_forward(self.linear1, self.linear2, self.norm3(x), residual=x)


class _Stack(nn.Module):
    """nn.TransformerEncoder / nn.TransformerDecoder: `layers` then the final `norm`."""

    def __init__(self, layers: list[nn.Module], d_model: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model, eps=eps)


class Transformer(nn.Module):
    """nn.Transformer(batch_first=True, norm_first=True, dropout=0.0) without masks:
    memory = encoder(src); out = decoder(tgt, memory)."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, eps: float = 1e-5):
        super().__init__()
        self.encoder = _Stack([EncoderLayer(d_model, nhead, dim_feedforward, eps) for _ in range(num_encoder_layers)], d_model, eps)
        self.decoder = _Stack([DecoderLayer(d_model, nhead, dim_feedforward, eps) for _ in range(num_decoder_layers)], d_model, eps)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory)
        memory = self.encoder.norm(memory)
        out = tgt
        for layer in self.decoder.layers:
            out = layer(out, memory)
        return self.decoder.norm(out)


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def extract_edit_head_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The edit head's entries of a larger state_dict (MGIE's mllm.pt: `edit_head.*` next to the
    LLM's embed_tokens / lm_head), with the prefix ending in 'edit_head.' removed."""
    prefixes = {k[: k.index(EDIT_HEAD_MARKER) + len(EDIT_HEAD_MARKER)] for k in state_dict if EDIT_HEAD_MARKER in k}
    if not prefixes:
        sample = sorted(state_dict)[:5]
        raise CheckpointError("state_dict", f"no key contains {EDIT_HEAD_MARKER!r} (keys start {sample})")
    if len(prefixes) > 1:
        raise CheckpointError("state_dict", f"several edit heads, prefixes {sorted(prefixes)}; pass one head's state_dict")
    (prefix,) = prefixes
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class EditHead(nn.Module):
    """MGIE's EditMapper. Defaults are MGIE-7B's sizes; `forward(llm, emb)` -> (B, num_queries, out_dim).
    Inference only: forward runs under torch.no_grad()."""

    def __init__(self, llm_dim: int = 4096, hidden_dim: int = 512, out_dim: int = 768, num_queries: int = 77,
                 num_heads: int = 4, num_encoder_layers: int = 4, num_decoder_layers: int = 4,
                 dim_feedforward: int = 2048, eps: float = 1e-5):
        super().__init__()
        self.llm2hid = nn.Linear(llm_dim, hidden_dim)
        self.query = nn.Parameter(torch.randn(1, num_queries, hidden_dim))
        self.mapper = Transformer(hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, eps)
        self.hid2feat = nn.Linear(hidden_dim, out_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm2hid.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm2hid.weight.device

    @torch.no_grad()
    def forward(self, llm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """llm: (B, T, llm_dim) LLM hidden states at the [IMG] tokens; emb: their input embeddings,
        (B, T, llm_dim), or (1, T, llm_dim) / (T, llm_dim) shared by the batch (MGIE passes
        embed_tokens.weight[-8:].unsqueeze(0) with a batch of llm)."""
        if not isinstance(llm, torch.Tensor) or llm.dim() != 3 or llm.shape[-1] != self.llm2hid.in_features:
            raise ValueError(f"llm: expected a (batch, tokens, {self.llm2hid.in_features}) tensor, got {_shape(llm)}")
        B, T, D = llm.shape
        if not isinstance(emb, torch.Tensor) or emb.shape[-2:] != (T, D) or emb.dim() not in (2, 3) \
                or (emb.dim() == 3 and emb.shape[0] not in (1, B)):
            raise ValueError(f"emb: expected ({B}, {T}, {D}), (1, {T}, {D}) or ({T}, {D}) to match llm, got {_shape(emb)}")
        hid = ops.linear(llm + emb, self.llm2hid.weight, self.llm2hid.bias)  # (B, T, hidden); a shared emb broadcasts
        query = self.query.expand(llm.shape[0], -1, -1)  # (B, Q, hidden), no copy
        return ops.linear(self.mapper(hid, query), self.hid2feat.weight, self.hid2feat.bias)  # (B, Q, out_dim)

    @classmethod
    def from_mgie(cls, checkpoint: str | os.PathLike | dict, *, num_heads: int = 4, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> "EditHead":
        """Build and load from MGIE's mllm.pt (read with weights_only=True), from any state_dict
        holding `...edit_head.*` keys, or from the edit head's own state_dict. Sizes come from the
        weights; the head count, which weights do not record, from num_heads (MGIE: 4)."""
        state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
        if "llm2hid.weight" not in state:
            state = extract_edit_head_state(state)
        for key in ("llm2hid.weight", "query", "hid2feat.weight", "mapper.encoder.layers.0.linear1.weight"):
            if key not in state:
                raise CheckpointError("checkpoint", f"edit-head entry {key!r} is missing (found {sorted(state)[:8]} ...)")
        hidden_dim, llm_dim = state["llm2hid.weight"].shape
        count = lambda stack: len({k.split(".")[3] for k in state if k.startswith(f"mapper.{stack}.layers.")})  # noqa: E731
        head = cls(llm_dim=llm_dim, hidden_dim=hidden_dim, out_dim=state["hid2feat.weight"].shape[0],
                   num_queries=state["query"].shape[1], num_heads=num_heads,
                   num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
                   dim_feedforward=state["mapper.encoder.layers.0.linear1.weight"].shape[0])
        head.load_state_dict(match_state_dict(state, head.state_dict(), owner="EditHead"))
        return head.to(device=device, dtype=dtype).eval()
