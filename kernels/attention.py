# Multi-head attention forward, FlashAttention-2 style: out = softmax(q kᵀ · scale) v, or
# relu(q kᵀ · scale) v / Lk for MobileDiffusion's ReLU attention.
#
# One program per (BLOCK_M query rows, batch·head). The Q tile stays in registers; K/V tiles
# stream past it, the (BLOCK_M, BLOCK_N) score tile lives only in registers, and the softmax is
# the online one (running max m and sum l in fp32, accumulator rescaled when m grows).
# Memory traffic: q and out once, K/V once per query block: (Lq + 2·Lk·ceil(Lq/BLOCK_M))·H·D
# elements per batch (shared K/V: one K/V read instead of two). The head dim is padded to a power
# of two in registers only (masked loads), so 40/72/80/160 need no padded copies in memory.
# Short key sets (one K/V tile, e.g. 77 text tokens) take a single-pass path without the
# online-softmax rescaling.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output

_LOG2_E = 1.4426950408889634

# Largest padded (keys × head dim) tile handled in one pass: 256 keys at D ≤ 64, 128 at D ≤ 128,
# 64 at D = 256 — beyond that the K and V tiles stop fitting in shared memory next to Q.
_SINGLE_PASS_ELEMENTS = 256 * 64


@triton.jit
def _scores(q, k_tile, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores q · kᵀ for a (BLOCK_N, BLOCK_D) K tile."""
    return tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    num_heads, seqlen_q, seqlen_k, head_dim,
    score_scale,  # scale (relu) or scale·log2(e) (softmax, evaluated with exp2)
    inv_seqlen_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SHARED_KV: tl.constexpr, RELU: tl.constexpr, SINGLE_PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_N)
    dim_ok = dims < head_dim

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    # Padded rows/dims load as 0: padded dims add nothing to q·k, padded query rows are not stored.
    q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :], mask=(rows[:, None] < seqlen_q) & dim_ok[None, :], other=0.0)
    p_dtype = q.dtype  # second product in the input dtype (fp16/bf16 tensor cores), like FA2

    if SINGLE_PASS:
        key_ok = keys < seqlen_k
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_tile = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        if SHARED_KV:
            v_tile = k_tile
        else:
            v_tile = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k_tile, DOT_PRECISION) * score_scale
        if RELU:
            # Padded keys are zero rows, so their scores are 0 and relu keeps them 0.
            acc = tl.dot(tl.maximum(s, 0.0).to(p_dtype), v_tile, input_precision=DOT_PRECISION)
        else:
            s = tl.where(key_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            acc = tl.dot(p.to(p_dtype), v_tile, input_precision=DOT_PRECISION)
            acc = acc / tl.sum(p, axis=1)[:, None]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start_n in range(0, seqlen_k, BLOCK_N):
            n_idx = start_n + keys
            key_ok = n_idx < seqlen_k
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k_tile = tl.load(k_base + n_idx[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
            if SHARED_KV:
                v_tile = k_tile
            else:
                v_tile = tl.load(v_base + n_idx[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
            s = _scores(q, k_tile, DOT_PRECISION) * score_scale
            if RELU:
                acc = tl.dot(tl.maximum(s, 0.0).to(p_dtype), v_tile, acc, input_precision=DOT_PRECISION)
            else:
                s = tl.where(key_ok[None, :], s, float("-inf"))
                # Every tile holds at least one real key, so m_new is finite and alpha well defined.
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = tl.dot(p.to(p_dtype), v_tile, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m_i = m_new
        if not RELU:
            acc = acc / l_i[:, None]
    if RELU:
        # 1/Lk applied once at the end: scaling the weights first would push fp16 ones toward subnormals.
        acc = acc * inv_seqlen_k

    out_base = out_ptr + batch * stride_ob + head * stride_oh
    tl.store(out_base + rows[:, None] * stride_om + dims[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < seqlen_q) & dim_ok[None, :])


def _launch_config(block_d: int, seqlen_k: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, single_pass, num_warps, num_stages) for H100: each choice compiled for sm_90
    without register spills (tests/triton_sm90_compile.py). fp32 uses ieee FMA dots, whose operand
    tiles live in registers, hence its smaller tiles."""
    wide = dtype == torch.float32
    block_n_all = max(16, triton.next_power_of_2(seqlen_k))
    if seqlen_k <= 256 and block_n_all * block_d * (2 if wide else 1) <= _SINGLE_PASS_ELEMENTS:
        if wide:
            return 32, block_n_all, True, 8, 1
        block_m = 128 if block_n_all <= 64 else 64  # score tile BLOCK_M × all keys ≤ 64 registers/thread
        return block_m, block_n_all, True, 8 if block_m * block_n_all > 64 * 64 else 4, 1
    if wide:
        return (64, 32, False, 8, 2) if block_d <= 128 else (32, 16, False, 4, 2)
    if block_d <= 128:
        return 128, 64, False, 8, 3
    return 64, 32, False, 8, 2


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v=None, *, scale=None, kind="softmax"):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    shared_kv = v is None
    v = k if shared_kv else _last_dim_contiguous(v)
    out = new_output((B, Lq, H, D), like=q)

    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K ≥ 16
    block_m, block_n, single_pass, num_warps, num_stages = _launch_config(block_d, Lk, q.dtype)
    relu = kind == "relu"
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attention_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, D,
        scale if relu else scale * _LOG2_E,
        1.0 / Lk,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SHARED_KV=shared_kv, RELU=relu, SINGLE_PASS=single_pass,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
