"""int8 W8A8 (ops.quantize_weight, ops.linear / ops.conv2d with an Int8Weight, fastdiff.quantize):
the C++ kernel against its twin (reference.linear_int8, exact integer sums in float64) to fp32
rounding, at each SIMD path (AVX-512 VNNI / AVX2 / scalar); the whole quantized op against the
float64 product; convolutions; errors; a quantized tiny MobileDiffusion UNet against fp32."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdiff
import fastdiff.ops as ops
from fastdiff import shapes
from fastdiff.ops import cpp_build, reference
from helpers import backend_param

CASES = shapes.int8_linear_cases(size=shapes.QUICK)
# After quantization only fp32 rounding is left: float(sum) * (sa * sw) + bias with one fma and a
# rounded scale product, a few ulp of the terms' magnitude.
KERNEL_BOUND = 2**-21
# The quantized op against the float64 product on standard-normal x and weights ~ N(0, 1/in): each
# operand rounds to 1/254 of its row's max (~3-4 sigma), ~1 % relative L2 error in all.
WHOLE_OP_BOUND = 2e-2
# The tiny MobileDiffusion UNet (seed 0; 43 products quantized, the separable convolutions,
# conv_in/out and the time embedding in fp32) against its fp32 output: 1.05e-2 relative L2 measured
# (max abs 0.015 on outputs up to 1.7), on the reference and the C++ backend alike.
UNET_BOUND = 2e-2


def _case_inputs(case):
    (x, weight, bias), _ = case.inputs(dtype=torch.float32)
    return x, weight, bias


def _kernel_error(case, backend):
    """max |kernel - twin| / (the magnitude of the terms), the kernel run with poisoned outputs."""
    return _kernel_error_of(*_case_inputs(case), backend)


def _kernel_error_of(x, weight, bias, backend):
    qweight = ops.quantize_weight(weight)
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.linear(x, qweight, bias)
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], weight.shape[0])
    assert torch.isfinite(out).all(), "unwritten (NaN) outputs"
    twin = reference.linear_int8(x.double(), qweight, None if bias is None else bias.double())
    q, row_scale = reference.quantize_rows_int8(x)
    magnitude = (q.abs().double() @ qweight.qweight.abs().double().T) * (row_scale.double() * qweight.scale.double())
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return ((out.double() - twin).abs() / magnitude.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("backend", [backend_param("cpp")])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_twin(case, backend):
    error = _kernel_error(case, backend)
    assert error <= KERNEL_BOUND, f"{case.name}: {error:.2e} of the terms' magnitude"


def _tile_edges_error(backend):
    """The worst _kernel_error_of over every row count a tile can end on (1..13 rows; 97 and 101:
    past a 96-row tile), with K = 777 in three K blocks and 70 channels (a partial last panel)."""
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(70, 777, generator=g) / 777**0.5, torch.randn(70, generator=g)
    return max(_kernel_error_of(torch.randn(rows, 777, generator=g), weight, bias, backend)
               for rows in (*range(1, 14), 97, 101))


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_kernel_tile_edges(backend):
    error = _tile_edges_error(backend)
    assert error <= KERNEL_BOUND, f"{error:.2e} of the terms' magnitude"


@pytest.mark.parametrize("backend", ["reference", backend_param("cpp")])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_quantized_linear_close_to_float64(case, backend):
    x, weight, bias = _case_inputs(case)
    with ops.use_backend(backend):
        out = ops.linear(x, ops.quantize_weight(weight), bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    error = ((out.double() - exact).norm() / exact.norm()).item()
    assert error <= WHOLE_OP_BOUND, f"{case.name}: relative L2 error {error:.2e}"


@pytest.mark.parametrize("level", ["avx2", "scalar"])
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_other_simd_paths(level, backend):
    """FASTDIFF_SIMD caps the path (this CPU has VNNI): AVX2's vpmaddubsw and the plain loops match the twin too."""
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_int8 as t
from fastdiff import ops
assert ops.int8_path() == {level!r}, ops.int8_path()
for case in t.CASES:
    if case.model == "odd" or case.name in ("sd15-proj-64x64", "md-text-kv"):
        error = t._kernel_error(case, "cpp")
        assert error <= t.KERNEL_BOUND, (case.name, error)
error = t._tile_edges_error("cpp")
assert error <= t.KERNEL_BOUND, ("tile edges", error)
for conv in t.CONVS:
    error = t._conv_kernel_error(*conv, "cpp", channels=160)
    assert error <= t.KERNEL_BOUND, (conv, error)
"""
    env = dict(os.environ, FASTDIFF_SIMD=level)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_special_rows_and_inputs(backend):
    """A zero row gives the bias; a huge and a tiny row keep their scale; bf16 x and a residual;
    the same Int8Weight again (its packed layout reused)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 77, generator=g)
    x[1] = 0
    x[2] *= 1e20
    x[3] *= 1e-20
    weight, bias = torch.randn(40, 77, generator=g), torch.randn(40, generator=g)
    qweight = ops.quantize_weight(weight)
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.linear(x, qweight, bias)
        again = ops.linear(x, qweight, bias)
        residual = torch.randn(5, 40, generator=g)
        with_residual = ops.linear(x, qweight, bias, residual=residual)
        low = ops.linear(x[4:].bfloat16(), qweight, bias.bfloat16())
    twin = reference.linear_int8(x.double(), qweight, bias.double())
    assert torch.equal(out[1], bias)
    assert torch.allclose(out.double(), twin, rtol=1e-5, atol=1e-5 * bias.abs().max().item())
    assert torch.equal(again, out)
    assert torch.allclose(with_residual, out + residual, rtol=0, atol=1e-6 * out.abs().max().item())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference.linear_int8(x[4:].bfloat16(), qweight, bias.bfloat16()).float(),
                          rtol=1e-2, atol=1e-2)


CONVS = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 2)]  # (kernel, stride, padding)


def _conv_case(kernel, stride, padding, channels=24):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, channels, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(70, channels, kernel, kernel, generator=g) / (channels * kernel**2) ** 0.5
    return x, weight, torch.randn(70, generator=g)


def _conv_kernel_error(kernel, stride, padding, backend, channels=24):
    """ops.conv2d on an Int8Weight against the twin (linear_int8 on F.unfold's patches), as
    _kernel_error_of: max |kernel - twin| / the terms' magnitude, outputs poisoned."""
    x, weight, bias = _conv_case(kernel, stride, padding, channels)
    qweight = ops.quantize_weight(weight)
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.conv2d(x, qweight, bias, stride=stride, padding=padding)
    patches = F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2)  # (N, L, C*k*k)
    twin = reference.linear_int8(patches.double(), qweight, bias.double())
    q, row_scale = reference.quantize_rows_int8(patches)
    magnitude = (q.abs().double() @ qweight.qweight.abs().double().T) * (row_scale.double() * qweight.scale.double())
    magnitude = magnitude + bias.double().abs()
    rows = out.permute(0, 2, 3, 1).reshape(twin.shape)
    assert torch.isfinite(rows).all(), "unwritten (NaN) outputs"
    return ((rows.double() - twin).abs() / magnitude.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("backend", [backend_param("cpp")])
@pytest.mark.parametrize("kernel, stride, padding", CONVS)
def test_conv2d_kernel_matches_twin(kernel, stride, padding, backend):
    """24 channels (a 216-wide patch) and 160 (1440: four K blocks), to fp32 rounding."""
    errors = [_conv_kernel_error(kernel, stride, padding, backend, channels) for channels in (24, 160)]
    assert max(errors) <= KERNEL_BOUND, f"{errors} of the terms' magnitude"


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_conv2d_kernel_makes_no_float_patches(backend, monkeypatch):
    """The C++ convolution gathers each output pixel's patch itself: F.unfold is never called."""
    monkeypatch.setattr(F, "unfold", lambda *args, **kwargs: pytest.fail("the C++ int8 convolution called F.unfold"))
    x, weight, bias = _conv_case(3, 1, 1)
    with ops.use_backend(backend):
        assert ops.conv2d(x, ops.quantize_weight(weight), bias, padding=1).shape == (3, 70, 9, 7)


@pytest.mark.parametrize("backend", ["reference", backend_param("cpp")])
@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv2d_int8(kernel, stride, padding, backend):
    """A residual is added; the result is channels_last (from either memory format of x) and
    within the quantization error of the float64 convolution; bf16 x comes back bf16."""
    x, weight, bias = _conv_case(kernel, stride, padding)
    qweight = ops.quantize_weight(weight)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=padding)
    residual = torch.randn(exact.shape, generator=torch.Generator().manual_seed(5))
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.conv2d(x, qweight, bias, residual=residual, stride=stride, padding=padding)
        plain = ops.conv2d(x.contiguous(), qweight, bias, stride=stride, padding=padding)
        low = ops.conv2d(x.bfloat16(), qweight, bias.bfloat16(), stride=stride, padding=padding)
    assert out.shape == exact.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, plain + residual, rtol=0, atol=1e-6 * plain.abs().max().item())
    error = ((out.double() - residual.double() - exact).norm() / exact.norm()).item()
    assert error <= WHOLE_OP_BOUND, f"relative L2 error {error:.2e}"
    assert low.dtype == torch.bfloat16
    assert ((low.double() - exact).norm() / exact.norm()).item() <= WHOLE_OP_BOUND


def test_int8_errors():
    qweight = ops.quantize_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="x: expected in_features 16"):
        ops.linear(torch.randn(2, 15), qweight)
    with pytest.raises(ValueError, match="bias: expected shape \\(8,\\)"):
        ops.linear(torch.randn(2, 16), qweight, torch.randn(7))
    with pytest.raises(ValueError, match="residual: expected the output's shape"):
        ops.linear(torch.randn(2, 16), qweight, residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="weight: an Int8Weight of shape .* call ops.linear"):
        ops.conv2d(torch.randn(1, 16, 4, 4), qweight)
    conv = ops.quantize_weight(torch.randn(8, 4, 3, 3))
    with pytest.raises(ValueError, match="call ops.conv2d"):
        ops.linear(torch.randn(2, 36), conv)
    with pytest.raises(ValueError, match="groups: an Int8Weight convolution takes groups=1"):
        ops.conv2d(torch.randn(1, 8, 5, 5), ops.quantize_weight(torch.randn(8, 4, 3, 3)), groups=2)
    with pytest.raises(ValueError, match="weight: expected \\(out_channels, 5, kh, kw\\)"):
        ops.conv2d(torch.randn(1, 5, 5, 5), conv)
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        ops.quantize_weight([1.0])
    with pytest.raises(ValueError, match="weight: expected a non-empty"):
        ops.quantize_weight(torch.randn(4))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        fastdiff.quantize(torch.nn.Linear(4, 4), dtype="int4")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fastdiff.quantize("unet")


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_binding_checks_its_arguments(backend):
    """The extension's own checks, for a caller that skips fastdiff.ops: each names its argument."""
    C = cpp_build.load()
    qweight = ops.quantize_weight(torch.randn(70, 10))
    packed, correction = C.int8_pack_weight(qweight.qweight)
    assert tuple(packed.shape) == (2, 3, 64, 4) and tuple(correction.shape) == (128,)
    x, scale = torch.randn(3, 10), qweight.scale
    with pytest.raises(RuntimeError, match="qweight: expected int8"):
        C.int8_pack_weight(qweight.qweight.float())
    with pytest.raises(RuntimeError, match=r"qweight: expected values in \[-127, 127\]"):
        C.int8_pack_weight(torch.full((2, 4), -128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x: expected a float32 CPU tensor"):
        C.int8_linear(x.double(), packed, correction, scale, None, 70)
    with pytest.raises(RuntimeError, match="packed: expected shape"):
        C.int8_linear(torch.randn(3, 20), packed, correction, scale, None, 70)
    with pytest.raises(RuntimeError, match="w_scale: expected a float32 CPU vector of 70"):
        C.int8_linear(x, packed, correction, scale[:69], None, 70)
    with pytest.raises(RuntimeError, match="bias: expected a float32 CPU vector of 70"):
        C.int8_linear(x, packed, correction, scale, torch.randn(7), 70)
    with pytest.raises(RuntimeError, match="correction: expected a contiguous int32"):
        C.int8_linear(x, packed, correction.float(), scale, None, 70)
    conv = ops.quantize_weight(torch.randn(70, 4, 3, 3))
    conv_packed, conv_correction = C.int8_pack_weight(conv.qweight)
    pixels = torch.randn(1, 5, 5, 4)

    def conv2d(x=pixels, stride=(1, 1), padding=(1, 1)):
        return C.int8_conv2d(x, conv_packed, conv_correction, conv.scale, None, 70, (3, 3), stride, padding, (1, 1))

    assert conv2d().shape == (1, 5, 5, 70)
    with pytest.raises(RuntimeError, match=r"x: expected a \(batch, height, width, channels\) map"):
        conv2d(pixels[0])
    with pytest.raises(RuntimeError, match="stride: expected two ints >= 1"):
        conv2d(stride=(0, 1))
    with pytest.raises(RuntimeError, match="padding: expected two ints >= 0"):
        conv2d(padding=(1,))
    with pytest.raises(RuntimeError, match=r"x: a 1x1 map padded by \(0, 0\) is smaller"):
        conv2d(torch.randn(1, 1, 1, 4), padding=(0, 0))
    with pytest.raises(RuntimeError, match=r"packed: expected shape .* kh \* kw \* channels"):
        conv2d(torch.randn(1, 5, 5, 5))


def _tiny_unet():
    from fastdiff.models.mobilediffusion import PRESETS, MobileDiffusionUNet

    torch.manual_seed(0)
    config = PRESETS["tiny"]
    model = MobileDiffusionUNet(config).eval()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=g)
    context = torch.randn(2, config.text_length, config.cross_attention_dim, generator=g)
    return model, (sample, torch.tensor([999.0, 17.0]), context)


@pytest.mark.parametrize("backend", ["reference", backend_param("cpp")])
def test_quantized_mobilediffusion_unet_close_to_fp32(backend):
    model, inputs = _tiny_unet()
    with torch.inference_mode(), ops.use_backend(backend):
        fp32 = model(*inputs)
        names = fastdiff.quantize(model)
        int8 = model(*inputs)
    assert len(names) == 43 and "conv_in" not in names and not any("time_emb" in n for n in names)
    assert isinstance(model.get_submodule(names[0]).weight, ops.Int8Weight)
    assert not any("pointwise" in n for n in names), "the fused separable convolutions' weights must stay float"
    error = ((int8 - fp32).norm() / fp32.norm()).item()
    assert 0 < error <= UNET_BOUND, f"relative L2 error {error:.2e} of the int8 UNet against fp32"
    assert fastdiff.quantize(model) == [], "a second call finds nothing left to quantize"
