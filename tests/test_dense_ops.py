"""ops.linear and ops.conv2d (the models' dense products) against their float64 twins, on every backend.

The C++ backend runs them through torch's oneDNN with packed weights (fastdiff.ops.onednn); the
reference backend is plain F.linear / F.conv2d. Shapes: the models' products (SD1.5's projections,
1x1 proj_in/out as GEMMs on tokens, the UNet's 3x3 convs, stride-2 downsamplers, conv_in/conv_out,
MobileDiffusion's shared K/V, a time embedding of one row), each cut to a size the float64 twin
runs in a fraction of a second, and odd ones (tails off every block size, groups, dilation, 1x1
maps, NCHW inputs). Then residuals (fused or not), the weight cache's invalidation, a missing C++
build, gradients and argument errors. Bounds: fastdiff.validate's table (fp32 1e-5 relative; bf16
twice torch's own bf16 error, floor 4e-3), outputs poisoned with NaN first.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import reference
from helpers import backend_param, check_against_reference

BACKENDS = [backend_param("reference"), backend_param("cpp")]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# name: (lead dims, in features, out features, bias, weight as a 1x1 conv's (O, I, 1, 1), residual)
LINEAR = {
    "sd15-to_q-64x64": ((2, 256), 320, 320, False, False, False),
    "sd15-to_out+residual": ((2, 256), 320, 320, True, False, True),
    "sd15-proj_in-1x1": ((2, 64), 640, 640, True, True, False),
    "sd15-proj_out-1x1+residual": ((2, 64), 640, 640, True, True, True),
    "sd15-geglu-proj": ((1, 16), 1280, 10240, True, False, False),
    "sd15-ff-out+residual": ((2, 16), 5120, 1280, True, False, True),
    "sd15-to_k-text": ((2, 77), 768, 320, False, False, False),
    "md-to_kv-text": ((2, 77), 768, 640, False, False, False),
    "time-embedding-1row": ((1,), 320, 1280, True, False, False),
    "3x7x13-37to29": ((3, 7, 13), 37, 29, True, False, True),
    "5-1to3": ((5,), 1, 3, True, False, False),
    "17to1-nobias": ((4, 3), 17, 1, False, False, False),
    "1d-24to40": ((), 24, 40, True, False, False),
}

# name: (N, C, H, W, out channels, kernel, stride, padding, dilation, groups, bias, residual, channels_last)
CONV = {
    "sd15-conv_in-4to320": (2, 4, 16, 16, 320, 3, 1, 1, 1, 1, True, False, True),
    "sd15-resnet-320x8x8+residual": (2, 320, 8, 8, 320, 3, 1, 1, 1, 1, True, True, True),
    "sd15-resnet-640to1280-4x4": (2, 640, 4, 4, 1280, 3, 1, 1, 1, 1, True, False, True),
    "sd15-shortcut-1x1-320to640": (2, 320, 8, 8, 640, 1, 1, 0, 1, 1, True, False, True),
    "sd15-downsample-stride2": (2, 320, 16, 16, 320, 3, 2, 1, 1, 1, True, False, True),
    "sd15-conv_out-320to4": (2, 320, 16, 16, 4, 3, 1, 1, 1, 1, True, False, True),
    "vae-downsample-pad0": (1, 128, 17, 17, 128, 3, 2, 0, 1, 1, True, False, True),
    "taesd-64x24x24+residual": (1, 64, 24, 24, 64, 3, 1, 1, 1, 1, False, True, True),
    "ip2p-conv_in-8to320-odd-map": (3, 8, 9, 13, 320, 3, 1, 1, 1, 1, True, False, True),
    "nchw-40to72-7x13": (3, 40, 7, 13, 72, 3, 1, 1, 1, 1, True, False, False),
    "nchw-residual-17to33": (1, 17, 5, 6, 33, 3, 1, 1, 1, 1, True, True, False),
    "1x1-map-72to40": (2, 72, 1, 1, 40, 3, 1, 1, 1, 1, False, False, True),
    "groups2-dilation2-5x5": (1, 32, 11, 9, 48, 5, 1, 4, 2, 2, True, False, True),
    "stride-2x1-pad-1x2": (1, 24, 10, 12, 20, (3, 5), (2, 1), (1, 2), 1, 1, True, False, True),
}


def _linear_args(name):
    """(x, weight, bias, residual) in float64."""
    lead, fin, fout, bias, as_conv, residual = LINEAR[name]
    g = torch.Generator().manual_seed(0)
    x = _randn(g, *lead, fin)
    weight = _randn(g, fout, fin, scale=fin**-0.5)
    weight = weight[:, :, None, None] if as_conv else weight
    return x, weight, _randn(g, fout) if bias else None, _randn(g, *lead, fout) if residual else None


def _conv_args(name):
    """((x, weight, bias, residual) in float64, the geometry keywords)."""
    N, C, H, W, O, k, stride, padding, dilation, groups, bias, residual, _ = CONV[name]
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(0)
    x = _randn(g, N, C, H, W)
    weight = _randn(g, O, C // groups, kh, kw, scale=(C // groups * kh * kw) ** -0.5)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out_shape = reference.conv2d(x, weight, **geometry).shape
    return (x, weight, _randn(g, O) if bias else None, _randn(g, *out_shape) if residual else None), geometry


def _conv_cast(name):
    """Every 4-D tensor (map, weight, residual) in channels_last, as the models hold them; the odd
    NCHW cases as they are."""
    channels_last = CONV[name][-1]

    def cast(value, dtype, device):
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device=device, dtype=dtype)
        return value.contiguous(memory_format=torch.channels_last) if channels_last and value.dim() == 4 else value

    return cast


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_matches_reference(name, backend, dtype):
    out, _, _ = check_against_reference("linear", _linear_args(name), {}, backend, dtype)
    lead, _, fout, *_ = LINEAR[name]
    assert out.shape == (*lead, fout) and out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONV))
def test_conv2d_matches_reference(name, backend, dtype):
    args, geometry = _conv_args(name)
    out, _, _ = check_against_reference("conv2d", args, geometry, backend, dtype, cast=_conv_cast(name))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_in_another_layout_or_view_is_added(backend):
    """A residual the epilogue cannot take as is (NCHW next to a channels_last map, a strided
    view of tokens) is still added, once."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    weight, residual = torch.randn(24, 16, 3, 3, generator=g) / 12, torch.randn(2, 24, 5, 7, generator=g)
    with ops.use_backend(backend):
        out = ops.conv2d(x, weight, None, residual, padding=1)
    torch.testing.assert_close(out, reference.conv2d(x, weight, None, residual, padding=1), rtol=1e-5, atol=1e-5)
    tokens, w = torch.randn(2, 9, 32, generator=g), torch.randn(8, 32, generator=g)
    wide = torch.randn(2, 9, 24, generator=g)
    with ops.use_backend(backend):
        out = ops.linear(tokens, w, None, wide[..., 4:12])
    torch.testing.assert_close(out, tokens @ w.T + wide[..., 4:12], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_a_changed_weight_is_repacked(backend):
    """The packed weight follows the weight: an in-place update, a new tensor in the same module
    (load_state_dict, .to()) and a weight used with another geometry each give fresh results."""
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad(), ops.use_backend(backend):
        first = ops.linear(x, linear.weight, linear.bias)
        linear.weight.mul_(2)
        torch.testing.assert_close(ops.linear(x, linear.weight, linear.bias), 2 * first - linear.bias, rtol=1e-5, atol=1e-5)
        linear.load_state_dict({"weight": torch.randn(16, 32, generator=g), "bias": linear.bias})
        torch.testing.assert_close(ops.linear(x, linear.weight, linear.bias), reference.linear(x, linear.weight, linear.bias))
        conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        m = torch.randn(1, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
        for stride, padding in ((1, 1), (2, 0), (1, 1)):
            torch.testing.assert_close(ops.conv2d(m, conv.weight, conv.bias, stride=stride, padding=padding),
                                       reference.conv2d(m, conv.weight, conv.bias, stride=stride, padding=padding),
                                       rtol=1e-5, atol=1e-5)


MODES = [pytest.param(torch.inference_mode, id="inference_mode"), pytest.param(torch.no_grad, id="no_grad")]
LAYERS = {"linear": (lambda: torch.nn.Linear(48, 40), (5, 48), lambda layer, x: ops.linear(x, layer.weight, layer.bias)),
          "conv2d": (lambda: torch.nn.Conv2d(24, 16, 3, padding=1), (1, 24, 7, 7),
                     lambda layer, x: ops.conv2d(x, layer.weight, layer.bias, padding=1))}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(LAYERS))
@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_load_state_dict_after_a_call_is_seen(backend, op, dtype, mode):
    """A layer made, run, given another layer's weights by load_state_dict (an in-place copy into the
    same storage) and run again, all under inference_mode or no_grad: the output is the other
    layer's. Under inference_mode the weights are inference tensors, which keep no version counter:
    their packed copy used to be reused, stale."""
    make, shape, call = LAYERS[op]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ops.reset_warnings()
    with warnings.catch_warnings(record=True) as record, mode(), ops.use_backend(backend):
        warnings.simplefilter("always")
        torch.manual_seed(0)
        layer = make().to(dtype)
        torch.manual_seed(1)
        other = make().to(dtype)
        first = call(layer, x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(call(layer, x), call(other, x))
        assert not torch.equal(first, call(other, x))
    packed_every_call = [w for w in record if "packed copy is made again on every call" in str(w.message)]
    assert len(packed_every_call) == (1 if mode is torch.inference_mode else 0), [str(w.message) for w in record]


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_a_swapped_storage_is_repacked_even_at_a_reused_address(backend):
    """`weight.data = ...` (as module.to() does) keeps the version counter; a new storage that the
    allocator places where the packed one was must not pass for it."""
    g = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(1024, 1024)
    x = torch.randn(4, 1024, generator=g)
    with torch.no_grad(), ops.use_backend(backend):
        for _ in range(8):  # freed and allocated alternately: glibc hands the first address back after a few rounds
            ops.linear(x, linear.weight, linear.bias)
            linear.weight.data = torch.randn(1024, 1024, generator=g)
            linear.weight.data = torch.randn(1024, 1024, generator=g)
            torch.testing.assert_close(ops.linear(x, linear.weight, linear.bias),
                                       reference.linear(x, linear.weight, linear.bias), rtol=1e-4, atol=1e-3)


@pytest.fixture
def cpp_missing():
    """Pretend the C++ extension failed to build."""
    ops.reset_warnings()
    with ops.simulate_unavailable("cpp", "ImportError: simulated missing extension"):
        yield


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_a_missing_cpp_build_leaves_the_dense_products_on_onednn(cpp_missing, monkeypatch):
    """Without the C++ extension the fastdiff kernels fall back to the reference (with their warning), the
    dense products stay on oneDNN: no warning, and the twin is never called."""
    monkeypatch.setattr(reference, "linear", None)
    monkeypatch.setattr(reference, "conv2d", None)
    x = torch.randn(4, 32)
    w = torch.randn(8, 32)
    m = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.linear(x, w)
        conv = ops.conv2d(m, torch.randn(4, 8, 3, 3), padding=1)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-5)
    assert conv.shape == (1, 4, 6, 6)
    with ops.use_backend("cpp"):  # asked for by name: the dense products still run
        ops.linear(x, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_through_plain_torch(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g, requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, generator=g, requires_grad=True)
    tokens, w = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g, requires_grad=True)
    with ops.use_backend(backend):
        out = ops.conv2d(x, weight, None, padding=1).sum() + ops.linear(tokens, w).square().sum()
    out.backward()
    expected = torch.autograd.grad(reference.conv2d(x, weight, None, padding=1).sum(), (x, weight))
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])
    torch.testing.assert_close(w.grad, 2 * (tokens @ w.T).T @ tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_deep_copied_after_running_gives_the_same_result(backend):
    """Packed weights stay outside the modules (oneDNN's tensors cannot be deep-copied)."""
    model = torch.nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad(), ops.use_backend(backend):
        first = ops.linear(x, model.weight, model.bias)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(ops.linear(x, twin.weight, twin.bias), first)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.linear([1.0], torch.randn(2, 1)), TypeError, "x: expected a torch.Tensor"),
        (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 3)), ValueError, r"weight: expected shape \(out_features, 4\)"),
        (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4, 3, 3)), ValueError, "weight: expected shape"),
        (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError, r"bias: expected shape \(5,\)"),
        (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 4)), ValueError,
         r"residual: expected the output's shape \(3, 5\)"),
        (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4).bfloat16()), TypeError, "weight: dtype"),
        (lambda: ops.linear(torch.randn(3, 4).long(), torch.randn(5, 4)), TypeError, "x: expected dtype"),
        (lambda: ops.linear(torch.tensor(1.0), torch.randn(5, 1)), ValueError, "x: expected at least one dimension"),
        (lambda: ops.conv2d(torch.randn(3, 4, 5), torch.randn(2, 4, 3, 3)), ValueError, "x: expected a rank-4"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3)), ValueError, r"weight: expected \(out_channels, 4"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), groups=3), ValueError, "groups"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), stride=0), ValueError, "stride"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), padding="same"), ValueError, "padding"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), dilation=(1, 2, 3)), ValueError, "dilation"),
        (lambda: ops.conv2d(torch.randn(1, 4, 2, 2), torch.randn(2, 4, 3, 3)), ValueError, "smaller than the"),
        (lambda: ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), None, torch.randn(1, 2, 5, 5)), ValueError,
         r"residual: expected the output's shape \(1, 2, 3, 3\)"),
    ],
)
def test_bad_arguments_are_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
