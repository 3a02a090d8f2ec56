"""C++ backend: thin wrappers over the compiled csrc/ (the extension module that
fastdiff.ops.cpp_build.load() builds on first use), same signatures as the reference twins.

Arguments are already checked by fastdiff.ops; the C++ side checks again (TORCH_CHECK) for
direct callers. Dtypes: hardware.backend_dtypes("cpp") (fp32 and bf16).
"""
from __future__ import annotations

import os

from fastdiff import hardware

from . import cpp_build
from ._dispatch import BackendConfigError

SIMD_CAPS = ("scalar", "avx2", "avx512")  # the FASTDIFF_SIMD values csrc/cpu_features.h understands


def _check_simd_cap():
    cap = os.environ.get("FASTDIFF_SIMD")
    if cap and cap not in SIMD_CAPS:
        raise BackendConfigError(f"FASTDIFF_SIMD={cap!r}: expected one of {', '.join(SIMD_CAPS)} (a cap on the C++ "
                                 f"kernels' SIMD level), or unset")


_check_simd_cap()  # on import, i.e. when the C++ backend is first used
_C = cpp_build.load()

_DTYPES = hardware.backend_dtypes("cpp")


def _check_dtype(name, t):
    if t.dtype not in _DTYPES:
        names = " or ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        raise TypeError(f"{name}: the C++ backend takes {names}, got {t.dtype}")


def attention(q, k, v=None, *, scale=None, kind="softmax"):
    _check_dtype("q", q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _C.attention(q, k, v, float(scale), kind == "relu")


def separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias):
    _check_dtype("x", x)
    return _C.separable_conv2d(x, dw_weight, dw_bias, pw_weight.reshape(pw_weight.shape[0], -1), pw_bias)


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, silu=False):
    _check_dtype("x", x)
    return _C.group_norm(x, num_groups, weight, bias, float(eps), bool(silu))


def glu(h, *, activation="gelu"):
    _check_dtype("h", h)
    return _C.glu(h, activation == "gelu")


def linear_int8(x, weight, bias=None, residual=None):
    """x (..., I) against an ops.Int8Weight: csrc/int8_linear.cpp on x's rows in float32 (x of
    another dtype is converted, the result converted back); the residual is added after."""
    packed, correction = weight.layout("cpp", _C.int8_pack_weight)
    rows = x.reshape(-1, x.shape[-1]).float()
    out = _C.int8_linear(rows, packed, correction, weight.scale, None if bias is None else bias.float(), weight.out_features)
    out = out.view(*x.shape[:-1], weight.out_features).to(x.dtype)
    return out if residual is None else out + residual


def _pack_patch_weight(qweight, shape):
    """A convolution's (O, C*kh*kw) qweight, in F.unfold's (c, ky, kx) order, packed in
    int8_conv2d's (ky, kx, c) order: its patches are gathered from the pixels' channel vectors."""
    out_channels, channels, kh, kw = shape
    return _C.int8_pack_weight(qweight.view(shape).permute(0, 2, 3, 1).reshape(out_channels, -1))


def conv2d_int8(x, weight, bias=None, residual=None, *, stride, padding, dilation):
    """x (N, C, H, W) against an ops.Int8Weight convolution (groups 1, zero padding; stride,
    padding, dilation: pairs): csrc/int8_linear.cpp's int8_conv2d, which gathers and quantizes each
    output pixel's patch itself (no F.unfold matrix). Returns channels_last (N, O, H', W')."""
    packed, correction = weight.layout("cpp_conv", lambda q: _pack_patch_weight(q, weight.shape))
    pixels = x.permute(0, 2, 3, 1).float()  # (N, H, W, C): a view of a channels_last x
    out = _C.int8_conv2d(pixels, packed, correction, weight.scale, None if bias is None else bias.float(),
                         weight.out_features, weight.kernel_size, stride, padding, dilation).to(x.dtype)
    if residual is not None:
        out = out + residual.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)


def int8_path() -> str:
    """The int8 GEMM of csrc/int8_linear.cpp on this CPU: "avx512_vnni", "avx2" or "scalar"."""
    return _C.int8_path()


def simd_level() -> str:
    """The SIMD level these kernels run at: "avx512_bf16", "avx512", "avx2" or "scalar"."""
    return _C.simd()


def fma_peak(iterations: int = 20_000_000) -> tuple[float, int, int]:
    """This CPU's fp32 FMA GFLOP/s on torch's threads, measured (12 register-only FMA chains per
    thread at simd_level()): (gflops, lanes per FMA, threads). ~0.1 s at the default iterations."""
    return _C.fma_peak(iterations)


set_poison_outputs = _C.set_poison_outputs
