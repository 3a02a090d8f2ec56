"""fastdiff's ops as real torch ops: torch.ops.fastdiff.*, opcheck, torch.compile without graph
breaks (each op, and both tiny UNets), and autograd through the reference twin's backward.

Compiling is slow on a small CPU: the ops are compiled once, together, with inductor; the UNets
with fullgraph=True on the aot_eager backend (dynamo + AOTAutograd + the ops' fake
implementations, without inductor's C++ code generation, which takes minutes for a UNet here).
"""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff import UNet2DCondition
from fastdiff.models.mobilediffusion import MobileDiffusionUNet
from fastdiff.models.unet_2d_condition import UNet2DConditionConfig
from fastdiff.ops import reference
from helpers import FP32_BOUND, rel_error

FP32_MODEL_BOUND = 1e-4  # whole-UNet fp32 bound, as in test_unet_2d_condition.py
OPS = ("attention", "separable_conv2d", "group_norm", "glu")
SD_TINY = dict(  # test_unet_2d_condition.TINY with 2 heads of 16 (on the attention kernel, not the reference fallback)
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=16,
)


def op_inputs(seed, dtype=torch.float32):
    """Fresh random arguments for each op, in the models' layouts (strided q/k views, channels_last maps)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    qkv = r(2, 6, 3 * 2 * 16)  # a fused projection: q, k, v are strided views of it
    q, k, v = (t.view(2, 6, 2, 16) for t in qkv.chunk(3, dim=-1))
    x = r(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    return {
        "attention": ((q, k, v, 0.25, "softmax"), (q, k, None, 0.3, "relu")),
        "separable_conv2d": ((x, r(8, 1, 3, 3), r(8), r(12, 8, 1, 1), r(12)), (x.contiguous(), r(8, 1, 3, 3), None, r(12, 8), None)),
        "group_norm": ((x, 4, r(8), r(8), 1e-5, True), (x.contiguous(), 2, None, None, 1e-6, False)),
        "glu": ((r(3, 4, 10), "gelu"), (r(3, 10), "silu")),
    }


def test_ops_are_registered_torch_ops():
    for name in OPS:
        op = getattr(torch.ops.fastdiff, name)
        assert isinstance(op.default, torch._ops.OpOverload)
        assert op.default._schema.name == f"fastdiff::{name}"
    assert "Tensor? v" in str(torch.ops.fastdiff.attention.default._schema)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema, fake tensor, autograd registration and AOT dispatch: fp32 both call forms (one with
    inputs requiring grad), bf16 one."""
    op = getattr(torch.ops.fastdiff, name).default
    first, second = op_inputs(0)[name]
    needs_grad = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in first)
    torch.library.opcheck(op, needs_grad)
    torch.library.opcheck(op, second, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, op_inputs(1, torch.bfloat16)[name][0], test_utils=("test_faketensor",))


def _door(name, args, module=ops):
    """ops.<name> (the public door; or the reference twin, module=reference) called with the
    registered op's positional arguments."""
    if name == "attention":
        q, k, v, scale, kind = args
        return module.attention(q, k, v, scale=scale, kind=kind)
    if name == "group_norm":
        x, groups, w, b, eps, silu = args
        return module.group_norm(x, groups, w, b, eps, silu=silu)
    if name == "glu":
        return module.glu(args[0], activation=args[1])
    return module.separable_conv2d(*args)


def test_fullgraph_inductor_compile_of_every_op_matches_eager():
    """One function calling every op (both call forms) and plain aten ops around them, compiled
    whole with inductor: no graph break, one node per op, outputs within the fp32 bound of eager
    and of the float64 twin (fresh inputs, so the compiled graph's guards and strides are reused)."""
    def every_op(cases):
        outs = []
        for name in OPS:
            for args in cases[name]:
                outs.append(_door(name, args) * 2.0 + 1.0)  # a pointwise consumer inductor fuses, reading the op's strides
        return outs

    torch._dynamo.reset()
    compiled = torch.compile(every_op, fullgraph=True, backend="inductor")
    with torch.no_grad():
        compiled(op_inputs(10))
        cases = op_inputs(11)
        got, eager = compiled(cases), every_op(cases)
    i = 0
    for name in OPS:
        for args in cases[name]:
            truth = _door(name, tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args), reference) * 2.0 + 1.0
            assert got[i].shape == eager[i].shape and got[i].stride() == eager[i].stride(), name
            assert rel_error(got[i], eager[i]) <= FP32_BOUND, name
            assert rel_error(got[i], truth) <= FP32_BOUND, name
            i += 1


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    md = MobileDiffusionUNet.from_preset("tiny").eval()
    sd = UNet2DCondition(UNet2DConditionConfig.from_diffusers(SD_TINY)).eval()
    return {"mobilediffusion-tiny": md, "unet2d-tiny": sd}


def _unet_inputs(unet, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, unet.config.in_channels, 16, 16, generator=g), torch.tensor([3.0, 700.0]),
            torch.randn(2, 7, unet.cross_attention_dim, generator=g))


@pytest.mark.parametrize("name", ["mobilediffusion-tiny", "unet2d-tiny"])
def test_tiny_unets_trace_without_graph_breaks_and_compiled_match_eager(unets, name):
    unet = unets[name]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(*_unet_inputs(unet, 0))
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    compiled(*_unet_inputs(unet, 1))
    inputs = _unet_inputs(unet, 2)  # fresh inputs on the compiled graph
    got, eager = compiled(*inputs), unet(*inputs)
    assert got.shape == eager.shape
    assert rel_error(got, eager) <= FP32_MODEL_BOUND


def _grad_case(name, seed):
    """The op's first call form, every tensor argument a leaf requiring grad."""
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in op_inputs(seed)[name][0])


@pytest.mark.parametrize("name", OPS)
def test_gradients_match_autograd_of_the_reference_twin(name):
    """Never an output silently without gradients: grad mode records the registered backward
    (the reference twin's vjp); the gradients equal autograd through the twin itself."""
    args = _grad_case(name, 3)
    out = _door(name, args)
    assert out.requires_grad and out.grad_fn is not None
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    got = torch.autograd.grad(out, tensors, grad_out)
    with ops.use_backend("reference"):  # the door runs the twin's aten ops: plain autograd
        expected_out = _door(name, args)
    expected = torch.autograd.grad(expected_out, tensors, grad_out)
    for a, b in zip(got, expected):
        assert rel_error(a, b) <= FP32_BOUND
