"""What pipelines rely on in both UNets (UNet2DCondition, MobileDiffusionUNet): the same attributes,
the same input rule (accepted forms, errors naming the argument), and inference outside no_grad."""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff import MobileDiffusionUNet, UNet2DCondition
from fastdiff.models.mobilediffusion import PRESETS
from fastdiff.models.unet_common import ConditionalUNet
from test_unet_2d_condition import make_diffusers_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unets():
    """name -> (model, in_channels, cross_attention_dim, out_channels)."""
    sd = UNet2DCondition.from_diffusers(make_diffusers_unet(in_channels=8, cross_attention_dim=48))
    torch.manual_seed(0)
    md = MobileDiffusionUNet(PRESETS["tiny"]).eval()
    return {"UNet2DCondition": (sd, 8, 48, 4), "MobileDiffusionUNet": (md, 3, 32, 3)}


NAMES = ["UNet2DCondition", "MobileDiffusionUNet"]


def inputs(unet, batch=2, hw=(8, 8), length=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, unet.in_channels, *hw, generator=g), torch.tensor([900.0, 20.0][:batch]),
            torch.randn(batch, length, unet.cross_attention_dim, generator=g))


@pytest.mark.parametrize("name", NAMES)
def test_same_attributes(unets, name):
    unet, in_channels, cross_attention_dim, out_channels = unets[name]
    assert isinstance(unet, ConditionalUNet)
    assert (unet.in_channels, unet.cross_attention_dim, unet.out_channels) == (in_channels, cross_attention_dim, out_channels)
    assert (unet.dtype, unet.device) == (torch.float32, torch.device("cpu"))
    assert type(unet.cross_attention_dim) is int
    bf16 = type(unet)(unet.config).to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_same_inputs_accepted(unets, name, hw):
    """Any map size (odd ones come back at their size), every timestep form, inputs of another
    floating dtype cast to the model's."""
    unet = unets[name][0]
    sample, _, context = inputs(unet, hw=hw)
    with ops.use_backend("reference"):
        outs = [unet(sample, t, context) for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500]))]
        cast = unet(sample.double(), 500, context.double())
    assert outs[0].shape == (2, unets[name][3], *hw) and outs[0].dtype == torch.float32
    for out in outs[1:] + [cast]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def _bad(unet):
    """case -> (args, error, message pattern) for this UNet's sizes."""
    sample, t, context = inputs(unet)
    C, D = unet.in_channels, unet.cross_attention_dim
    return {
        "sample-list": ((sample.tolist(), t, context), TypeError, rf"sample: expected a floating-point \(B, {C}, H, W\) tensor, got list"),
        "sample-int": ((sample.long(), t, context), TypeError, "sample: expected a floating-point"),
        "sample-3d": ((sample[0], t, context), ValueError, rf"sample: expected shape \(B, {C}, H, W\)"),
        "sample-channels": ((sample[:, :1], t, context), ValueError, rf"sample: expected shape \(B, {C}, H, W\)"),
        "sample-empty": ((sample[:, :, :0], t, context), ValueError, "sample: expected shape"),
        "sample-device": ((sample.to("meta"), t, context), ValueError, "sample: on meta, the model is on cpu"),
        "context-none": ((sample, t, None), TypeError, rf"encoder_hidden_states: expected a floating-point \(2, L, {D}\) tensor, got NoneType"),
        "context-2d": ((sample, t, context[0]), ValueError, rf"encoder_hidden_states: expected shape \(2, L, {D}\)"),
        "context-batch": ((sample, t, context[:1]), ValueError, rf"encoder_hidden_states: expected shape \(2, L, {D}\)"),
        "context-width": ((sample, t, context[..., :-1]), ValueError, "encoder_hidden_states: expected shape"),
        "context-empty": ((sample, t, context[:, :0]), ValueError, "encoder_hidden_states: expected shape"),
        "timestep-shape": ((sample, torch.tensor([1.0, 2.0, 3.0]), context), ValueError,
                           r"timestep: expected a number, a 1-element tensor or a \(2,\) tensor"),
        "timestep-str": ((sample, "999", context), TypeError, "timestep: expected a number or a tensor, got str"),
        "timestep-bool": ((sample, True, context), TypeError, "timestep: expected a number or a tensor, got bool"),
    }


BAD = ["sample-list", "sample-int", "sample-3d", "sample-channels", "sample-empty", "sample-device", "context-none",
       "context-2d", "context-batch", "context-width", "context-empty", "timestep-shape", "timestep-str", "timestep-bool"]


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("name", NAMES)
def test_same_errors(unets, name, case):
    unet = unets[name][0]
    cases = _bad(unet)
    assert set(cases) == set(BAD)
    args, error, pattern = cases[case]
    with pytest.raises(error, match=pattern), ops.use_backend("reference"):
        unet(*args)


@pytest.mark.parametrize("name", NAMES)
def test_called_outside_no_grad_runs_inference_only(unets, name):
    """A fresh model's parameters require grad; ops refuse those in grad mode, so forward runs
    under no_grad itself: the call works and matches inference_mode, without gradients."""
    unet = unets[name][0]
    assert torch.is_grad_enabled() and all(p.requires_grad for p in unet.parameters())
    args = inputs(unet)
    with ops.use_backend("reference"):
        out = unet(*args)
        with torch.inference_mode():
            expected = unet(*args)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
