"""fastdiff.quantize's modules as torch modules: the int8 weight as buffers that .to(),
state_dict() and load_state_dict() carry; float weights and IP-Adapters refused by name once
quantized."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdiff
import fastdiff.ops as ops
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig


def _unet(seed):
    torch.manual_seed(seed)
    config = UNet2DConditionConfig(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    return UNet2DCondition(config).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g)


@torch.no_grad()  # not inference_mode: its tensors keep no version, and the fp32 oneDNN layers' packed weights would go stale
def test_state_dict_round_trip():
    """A quantized model's state_dict (int8 qweight and float32 weight_scale per quantized layer)
    loads into another model quantized the same way, already run once (its packed weights are made
    again from the loaded values): the same outputs, bit for bit."""
    model = _unet(0)
    names = fastdiff.quantize(model)
    state = model.state_dict()
    assert names and all(f"{n}.qweight" in state and f"{n}.weight_scale" in state and f"{n}.weight" not in state
                         for n in names)
    assert state[f"{names[0]}.qweight"].dtype == torch.int8 and state[f"{names[0]}.weight_scale"].dtype == torch.float32
    other = _unet(1)
    fastdiff.quantize(other)
    before = other(*_inputs())
    other.load_state_dict(state)
    after = other(*_inputs())
    assert not torch.equal(before, after)
    assert torch.equal(after, model(*_inputs()))


@torch.inference_mode()
def test_to_moves_the_int8_weight_and_keeps_it_int8():
    model = _unet(0)
    name = fastdiff.quantize(model)[0]
    layer = model.get_submodule(name)
    model.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    out = model(*(t.bfloat16() for t in _inputs()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.to(torch.float32).to("meta")
    assert layer.weight.device.type == "meta" and layer.weight_scale.dtype == torch.float32
    assert isinstance(layer.weight, ops.Int8Weight) and layer.weight.qweight is layer.qweight


def test_float_weights_refused_once_quantized():
    model = _unet(0)
    float_state = model.state_dict()
    name = next(n for n in fastdiff.quantize(model) if isinstance(model.get_submodule(n), nn.Linear))
    with pytest.raises(CheckpointError, match=r"float weights for layers quantized by fastdiff.quantize \(load float "
                                              r"weights before quantizing\): down_blocks\.0\.attentions\.0\.proj_in\.weight"):
        model.load_state_dict(float_state)
    with pytest.raises(RuntimeError, match=rf"state_dict: {name}\.weight is a float weight, but {name} is quantized"):
        nn.Module.load_state_dict(model, float_state, strict=False)  # torch's own loading, module by module
    layer = model.get_submodule(name)
    with pytest.raises(AttributeError, match="weight: this Int8Linear is quantized"):
        layer.weight = torch.randn(layer.out_features, layer.in_features)
    with pytest.raises(KeyError, match="weight"):
        layer.weight = nn.Parameter(torch.randn(layer.out_features, layer.in_features))
    assert isinstance(layer.weight, ops.Int8Weight)


def test_ip_adapters_refused_once_quantized():
    model = _unet(0)
    fastdiff.quantize(model)
    layer_name = next(iter(model.cross_attention_layers()))
    inner = model.cross_attention_layers()[layer_name].to_q.weight.shape[0]
    adapter = (torch.randn(inner, 32), torch.randn(inner, 32), 1.0)
    with pytest.raises(TypeError, match=rf"layers\['{layer_name}'\]: this layer is quantized"):
        model.set_ip_adapters({layer_name: [adapter]})
    assert model.num_ip_adapters == 0
    model.set_ip_adapters({})  # removing none is fine


def test_ip_adapters_set_before_quantizing_are_quantized():
    model = _unet(0)
    layer_name = next(iter(model.cross_attention_layers()))
    inner = model.cross_attention_layers()[layer_name].to_q.weight.shape[0]
    model.set_ip_adapters({layer_name: [(torch.randn(inner, 32), torch.randn(inner, 32), 1.0)]})
    names = fastdiff.quantize(model)
    assert f"{layer_name}.to_k_ip.0" in names and f"{layer_name}.to_v_ip.0" in names
