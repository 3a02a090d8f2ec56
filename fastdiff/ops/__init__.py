"""fastdiff.ops: the only door to the kernels. One documented entry point per op.

Each op checks its arguments here (one clear ValueError/TypeError naming the argument), then
runs on the backend that `_dispatch.select` picks for the tensors' device: Triton for CUDA,
C++ for CPU, the reference twin (fastdiff.ops.reference) otherwise. Dtypes: fastdiff.hardware's
table (fp32 and bf16 on every backend, fp16 on GPU); accumulation in fp32.

The dense products `linear` and `conv2d` are torch's own: on the CPU through oneDNN with weights
packed once (fastdiff.ops.onednn, part of the C++ backend but independent of its build), else the
twin's F.linear / F.conv2d. They are plain torch functions rather than registered ops, so that
torch.compile (which gets the twin's aten ops) and autograd see plain products.

Each op is a registered torch op (torch.ops.fastdiff.*, fastdiff/ops/_library.py) with a fake
implementation, so torch.compile(fullgraph=True) traces it as one node and the backend is chosen
when the op runs. Autograd: the forward runs on the kernel, the backward is the reference twin's
(recomputed from the saved inputs), so gradients equal plain PyTorch's; nothing is cut silently.
Under the reference backend the door calls the twin directly (plain aten ops, as a TorchDispatchMode
such as the MAC counter or a tracer of plain PyTorch must see them).
"""
from __future__ import annotations

import numbers

import torch

from fastdiff import hardware

from . import _library, reference
from ._dispatch import (BACKENDS, backends, forced_backend, poison_outputs, reference_for, reset_warnings, select, selected_name,
                        simulate_unavailable, use_backend)
from ._library import FAST_HEAD_DIMS  # head dims the C++ and Triton attention kernels take
from .int8 import Int8Weight

__all__ = ["attention", "separable_conv2d", "group_norm", "glu", "linear", "conv2d", "backends", "use_backend", "forced_backend",
           "poison_outputs", "BACKENDS", "selected_name", "FAST_HEAD_DIMS", "cpp_simd_level", "reset_warnings",
           "simulate_unavailable"]

__all__ += ["Int8Weight", "quantize_weight", "int8_path"]  # the int8 (W8A8) path

_DTYPES = hardware.all_dtypes()


def _tensor(name, value, rank=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        raise TypeError(f"{name}: expected dtype {names}, got {value.dtype}")
    if rank is not None and value.dim() != rank:
        raise ValueError(f"{name}: expected a rank-{rank} tensor, got shape {tuple(value.shape)}")
    return value


def _plain_reference(op, device) -> bool:
    """True when the reference backend is forced (use_backend / FASTDIFF_BACKEND) in eager mode: the
    door then runs the twin's plain aten ops itself. Under torch.compile the registered op is traced
    (one node) and makes the same choice when it runs. Meta tensors run the op's fake
    implementation, so a forced backend that cannot take them is refused here."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "meta":
        select(op, "meta")
    return forced_backend() == "reference"


def _same_kind(reference_name, reference, **others):
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != reference.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from {reference_name}'s {reference.dtype}")
        if t.device != reference.device:
            raise ValueError(f"{name}: device {t.device} differs from {reference_name}'s {reference.device}")


def _vector(name, value, length):
    if value is None:
        return
    _tensor(name, value, rank=1)
    if value.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(value.shape)}")


def attention(q, k, v=None, *, scale=None, kind="softmax"):
    """Multi-head attention without materialising the (Lq, Lk) score matrix in memory.

    q: (batch, seqlen_q, heads, headdim); k, v: (batch, seqlen_k, heads, headdim), any headdim >= 1.
    Head dims outside FAST_HEAD_DIMS (8..256), which the kernels do not cover (diffusers' tiny
    configs have 4, a VAE-like single head 512), run on the reference twin, which does form the
    score matrix; one warning per process and head dim says so.
    v=None: shared K/V (MobileDiffusion's single projection); k is read once for both roles.
    scale: defaults to 1/sqrt(headdim).
    kind: "softmax", or "relu" for weights relu(q·kᵀ·scale) / seqlen_k (MobileDiffusion's ReLU attention).
    Strided views (e.g. slices of a fused projection) are accepted without copies.
    Returns (batch, seqlen_q, heads, headdim), contiguous. Differentiable (the reference twin's backward).
    """
    _tensor("q", q, rank=4)
    _tensor("k", k, rank=4)
    if v is not None:
        _tensor("v", v, rank=4)
    _same_kind("q", q, k=k, v=v)
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"k: expected (batch={B}, seqlen_k, heads={H}, headdim={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Lq < 1 or k.shape[1] < 1 or B < 1 or H < 1 or D < 1:
        raise ValueError(f"q, k: batch, heads, head dim and sequence lengths must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kind not in ("softmax", "relu"):
        raise ValueError(f"kind: expected 'softmax' or 'relu', got {kind!r}")
    if scale is None:
        scale = D**-0.5
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    if _plain_reference("attention", q.device):
        return reference.attention(q, k, v, scale=float(scale), kind=kind)
    return torch.ops.fastdiff.attention.default(q, k, v, float(scale), kind)  # backend and head-dim fallback chosen inside


def separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias):
    """Depthwise 3x3 (stride 1, padding 1) then pointwise 1x1, fused: the depthwise result never
    reaches memory at full size.

    x: (N, C, H, W), contiguous or channels_last; dw_weight: (C, 1, 3, 3); dw_bias: (C,) or None;
    pw_weight: (C_out, C, 1, 1) or (C_out, C); pw_bias: (C_out,) or None.
    Returns (N, C_out, H, W) in channels_last memory format. Differentiable (the reference twin's backward).
    """
    _tensor("x", x, rank=4)
    C = x.shape[1]
    _tensor("dw_weight", dw_weight, rank=4)
    if tuple(dw_weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"dw_weight: expected shape ({C}, 1, 3, 3) for x with {C} channels, got {tuple(dw_weight.shape)}")
    _tensor("pw_weight", pw_weight)
    if pw_weight.dim() not in (2, 4) or pw_weight.shape[1] != C or (pw_weight.dim() == 4 and pw_weight.shape[2:] != (1, 1)):
        raise ValueError(f"pw_weight: expected shape (C_out, {C}, 1, 1) or (C_out, {C}), got {tuple(pw_weight.shape)}")
    _vector("dw_bias", dw_bias, C)
    _vector("pw_bias", pw_bias, pw_weight.shape[0])
    _same_kind("x", x, dw_weight=dw_weight, dw_bias=dw_bias, pw_weight=pw_weight, pw_bias=pw_bias)
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if _plain_reference("separable_conv2d", x.device):
        return reference.separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias)
    return torch.ops.fastdiff.separable_conv2d.default(x, dw_weight, dw_bias, pw_weight, pw_bias)


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, silu=False):
    """GroupNorm with optional fused SiLU; statistics in fp32 whatever the input dtype.

    x: (N, C, H, W), contiguous or channels_last; num_groups divides C; weight, bias: (C,) or None.
    Returns x's shape, dtype and memory format. Differentiable (the reference twin's backward).
    """
    _tensor("x", x, rank=4)
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive int dividing the {C} channels of x, got {num_groups!r}")
    _vector("weight", weight, C)
    _vector("bias", bias, C)
    _same_kind("x", x, weight=weight, bias=bias)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if _plain_reference("group_norm", x.device):
        return reference.group_norm(x, num_groups, weight, bias, float(eps), silu=bool(silu))
    return torch.ops.fastdiff.group_norm.default(x, num_groups, weight, bias, float(eps), bool(silu))


def glu(h, *, activation="gelu"):
    """Gated linear unit in one pass: a, gate = h.chunk(2, -1); a * act(gate).

    h: (..., 2 * F); activation "gelu" (exact; SD's GEGLU) or "silu" (MobileDiffusion's SwiGLU).
    Returns (..., F), contiguous. Differentiable (the reference twin's backward).
    """
    _tensor("h", h)
    if h.dim() < 1 or h.shape[-1] % 2 or h.shape[-1] == 0:
        raise ValueError(f"h: expected a last dimension of even, non-zero size, got shape {tuple(h.shape)}")
    if activation not in ("gelu", "silu"):
        raise ValueError(f"activation: expected 'gelu' or 'silu', got {activation!r}")
    if _plain_reference("glu", h.device):
        return reference.glu(h, activation=activation)
    return torch.ops.fastdiff.glu.default(h, activation)


def cpp_simd_level() -> str:
    """The SIMD level of the C++ kernels in this process: "avx512_bf16", "avx512", "avx2" or "scalar",
    the widest this CPU has, capped by FASTDIFF_SIMD (read once per process). Loads the C++ backend
    (building it on first use); raises why when it cannot."""
    from . import cpp

    return cpp.simd_level()


def int8_path() -> str:
    """The int8 GEMM the C++ backend runs on this CPU: "avx512_vnni" (vpdpbusd), "avx2"
    (vpmaddubsw/vpmaddwd) or "scalar", capped like cpp_simd_level by FASTDIFF_SIMD. Loads the C++
    backend (building it on first use); raises why when it cannot."""
    from . import cpp

    return cpp.int8_path()


def quantize_weight(weight) -> Int8Weight:
    """`weight` quantized to int8 once, per output channel, symmetric (reference.quantize_weight_int8),
    for ops.linear (a linear's (O, I) or a 1x1 convolution's (O, I, 1, 1) weight) and ops.conv2d
    (any (O, C, kh, kw) weight of an ungrouped convolution). Those then quantize their input per
    row (per token; per output pixel's patch for a kh x kw convolution) and run a W8A8 GEMM with
    int32 sums: C++ on the CPU; elsewhere the twin (reference.linear_int8: exact, slow). Inference
    only: no gradient flows to the weight."""
    _tensor("weight", weight)
    if weight.dim() not in (2, 4) or weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty (out_features, in_features) or (out, in, kh, kw) tensor, "
                         f"got shape {tuple(weight.shape)}")
    with torch.inference_mode(False):  # qweight with a version counter, so its packed copy can be kept
        qweight, scale = reference.quantize_weight_int8(weight.detach().flatten(1))
    return Int8Weight(qweight, scale, tuple(weight.shape))


def _int8_backend(x):
    """The module that runs linear_int8 on x: the twin when traced or when the reference is forced,
    else the backend's kernel where it has one (the C++ backend), else the twin with one warning."""
    if torch.compiler.is_compiling() or _plain_reference("linear_int8", x.device):
        return reference
    module = select("linear_int8", x.device.type)
    if not hasattr(module, "linear_int8"):
        return reference_for("linear_int8", module, "this backend has no int8 kernel")
    return module


def _linear_int8(x, weight: Int8Weight, bias, residual):
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x: expected in_features {weight.in_features} (the int8 weight's), got shape {tuple(x.shape)}")
    _vector("bias", bias, weight.out_features)
    _same_kind("x", x, bias=bias, residual=residual)
    if x.device != weight.device:
        raise ValueError(f"weight: the int8 weight is on {weight.device}, x on {x.device}")
    return _int8_backend(x).linear_int8(x, weight, bias, residual)


def _dense_backend(op, *tensors):
    """The module that runs dense product `op`: the twin when traced (inductor generates the
    products itself), when a gradient is needed (autograd through plain torch) or when the
    reference is forced; else the backend's (oneDNN on a CPU)."""
    if torch.compiler.is_compiling() or _plain_reference(op, tensors[0].device):
        return reference
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return reference
    return select(op, tensors[0].device.type)


def _residual(residual, shape):
    if residual is not None and tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual: expected the output's shape {tuple(shape)}, got {tuple(residual.shape)}")


def linear(x, weight, bias=None, residual=None):
    """x·weightᵀ + bias (+ residual), with the residual added by the GEMM where the backend can.

    x: (..., I); weight: (O, I), or (O, I, 1, 1) (a 1x1 convolution's, applied to tokens), or such a
    weight's Int8Weight (quantize_weight: x quantized per row, W8A8, residual added after the GEMM);
    bias: (O,) or None; residual: (..., O) or None. Returns (..., O). Differentiable (plain torch;
    with an Int8Weight only in name: rounding has no gradient).
    """
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (..., in_features), got a scalar")
    if isinstance(weight, Int8Weight):
        if weight.kernel_size != (1, 1):
            raise ValueError(f"weight: an Int8Weight of shape {weight.shape} is a convolution's: call ops.conv2d")
        if residual is not None:
            _tensor("residual", residual)
            _residual(residual, (*x.shape[:-1], weight.out_features))
        return _linear_int8(x, weight, bias, residual)
    _tensor("weight", weight)
    if weight.dim() not in (2, 4) or (weight.dim() == 4 and weight.shape[2:] != (1, 1)) or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (out_features, {x.shape[-1]}) or (out_features, {x.shape[-1]}, 1, 1) "
                         f"for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    _vector("bias", bias, weight.shape[0])
    if residual is not None:
        _tensor("residual", residual)
        _residual(residual, (*x.shape[:-1], weight.shape[0]))
    _same_kind("x", x, weight=weight, bias=bias, residual=residual)
    return _dense_backend("linear", x, weight, bias, residual).linear(x, weight, bias, residual=residual)


def _pair(name, value, minimum):
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return tuple(pair)


def conv2d(x, weight, bias=None, residual=None, *, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution with zero padding (+ residual, added by the convolution where the backend can).

    x: (N, C, H, W), either memory format; weight: (O, C / groups, kh, kw); bias: (O,) or None;
    stride, padding, dilation: an int or a pair; residual: the output's shape, or None.
    weight may be an Int8Weight (quantize_weight; groups=1): a 1x1 convolution is a linear over
    the pixels, a larger one quantizes each output pixel's patch as a row (the C++ kernel gathers
    the patches itself, an int8 copy of kh*kw bytes per input value and output pixel; the reference
    runs on F.unfold's float patches).
    Returns (N, O, H', W') in channels_last memory format. Differentiable (plain torch).
    """
    _tensor("x", x, rank=4)
    if isinstance(weight, Int8Weight):
        return _conv2d_int8(x, weight, bias, residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    _tensor("weight", weight, rank=4)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"groups: expected a positive int dividing the {x.shape[1]} input and {weight.shape[0]} "
                         f"output channels, got {groups!r}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"weight: expected (out_channels, {x.shape[1] // groups}, kh, kw) for x with {x.shape[1]} "
                         f"channels in {groups} groups, got {tuple(weight.shape)}")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    _vector("bias", bias, weight.shape[0])
    out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
              for i in range(2)]
    if min(out_hw) < 1:
        raise ValueError(f"x: a {tuple(x.shape[2:])} map padded by {padding} is smaller than the "
                         f"{tuple(weight.shape[2:])} kernel (dilation {dilation})")
    if residual is not None:
        _tensor("residual", residual, rank=4)
        _residual(residual, (x.shape[0], weight.shape[0], *out_hw))
    _same_kind("x", x, weight=weight, bias=bias, residual=residual)
    return _dense_backend("conv2d", x, weight, bias, residual).conv2d(
        x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups, residual=residual)


def _conv2d_int8(x, weight: Int8Weight, bias, residual, *, stride, padding, dilation, groups):
    if len(weight.shape) != 4:
        raise ValueError(f"weight: an Int8Weight of shape {weight.shape} is a linear's: call ops.linear")
    if groups != 1:
        raise ValueError(f"groups: an Int8Weight convolution takes groups=1, got {groups!r}")
    out_channels, channels, kh, kw = weight.shape
    if x.shape[1] != channels:
        raise ValueError(f"weight: expected (out_channels, {x.shape[1]}, kh, kw) for x with {x.shape[1]} channels, "
                         f"got {weight.shape}")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * ((kh, kw)[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    if min(out_hw) < 1:
        raise ValueError(f"x: a {tuple(x.shape[2:])} map padded by {padding} is smaller than the {(kh, kw)} kernel "
                         f"(dilation {dilation})")
    if residual is not None:
        _tensor("residual", residual, rank=4)
        _residual(residual, (x.shape[0], out_channels, *out_hw))
    if (kh, kw) != (1, 1) or stride != (1, 1) or padding != (0, 0):
        _vector("bias", bias, out_channels)
        _same_kind("x", x, bias=bias, residual=residual)
        if x.device != weight.device:
            raise ValueError(f"weight: the int8 weight is on {weight.device}, x on {x.device}")
        return _int8_backend(x).conv2d_int8(x, weight, bias, residual, stride=stride, padding=padding, dilation=dilation)
    N = x.shape[0]
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of a channels_last x
    rows_residual = None if residual is None else residual.permute(0, 2, 3, 1).reshape(N, -1, out_channels)
    out = _linear_int8(rows.reshape(N, -1, rows.shape[-1]), weight, bias, rows_residual)  # (N, H'W', O)
    return out.view(N, *out_hw, out_channels).permute(0, 3, 1, 2)  # channels_last (N, O, H', W')
