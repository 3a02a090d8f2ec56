"""fastdiff.quantize's modules as torch modules: the int8 weight as buffers that .to(),
state_dict() and load_state_dict() carry; float weights and IP-Adapters refused by name once
quantized. And the user's doors: quantize="int8" in Pipeline.from_pretrained, the embedded
defaults, fastdiff.generate/edit and fastdiff.accelerate, and the CLI's --quantize."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fastdiff
import fastdiff.ops as ops
from fastdiff import cli
from fastdiff.accelerate import UnsupportedError
from fastdiff.api import get_pipeline
from fastdiff.default_model import default_pipeline
from fastdiff.loading import save_pipeline
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig
from fastdiff.pipeline import Pipeline
from fastdiff.quantization import is_quantized


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


@torch.no_grad()
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


MODES = [pytest.param(torch.inference_mode, id="inference_mode"), pytest.param(torch.no_grad, id="no_grad")]


@pytest.mark.parametrize("mode", MODES)
def test_load_state_dict_after_a_call_is_seen(mode):
    """Two models made, quantized (3x3 convolutions too) and run under inference_mode or no_grad;
    one loads the other's state_dict: it then gives the other's output. Under inference_mode the
    float layers (conv_in, conv_out, the time embedding) hold inference tensors, which keep no
    version counter: their packed copies used to be reused, stale."""
    with mode():
        model, other = _unet(0), _unet(1)
        fastdiff.quantize(model, conv3x3=True)
        fastdiff.quantize(other, conv3x3=True)
        first = model(*_inputs())
        model.load_state_dict(other.state_dict())
        expected = other(*_inputs())
        assert torch.equal(model(*_inputs()), expected)
        assert not torch.equal(first, expected)


def _int8_layer(kind, seed):
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(48, 40) if kind == "linear" else nn.Conv2d(24, 16, 3, padding=1))
    assert fastdiff.quantize(layer, conv3x3=True) == ["0"]
    return layer[0], torch.randn((5, 48) if kind == "linear" else (1, 24, 7, 7), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_values_copied_into_the_int8_buffers_are_used(kind, mode):
    """New values copied in place into a quantized layer's qweight and weight_scale (through the
    buffers, as load_state_dict does) are used from the next call: the packed qweight is made again."""
    with mode():
        layer, x = _int8_layer(kind, 0)
        other, _ = _int8_layer(kind, 1)
        first = layer(x)
        for name in ("qweight", "weight_scale", "bias"):
            getattr(layer, name).copy_(getattr(other, name))
        assert torch.equal(layer(x), other(x))
        assert not torch.equal(first, other(x))


def test_an_int8_weight_of_inference_tensors_is_packed_on_every_call():
    """An ops.Int8Weight made by hand from inference tensors: no version counter tells whether its
    qweight changed, so its kernel layout is made on every call (warned once), never kept stale."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 32, generator=g)
    new = ops.quantize_weight(torch.randn(8, 32, generator=g))
    ops.reset_warnings()
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="packed copy is made again on every call"):
        old = ops.quantize_weight(torch.randn(8, 32, generator=g))
        weight = ops.Int8Weight(old.qweight.clone(), old.scale.clone(), old.shape)
        assert weight.qweight.is_inference()
        torch.testing.assert_close(ops.linear(x, weight), ops.linear(x, old), rtol=0, atol=0)
        weight.qweight.copy_(new.qweight)
        weight.scale.copy_(new.scale)
        torch.testing.assert_close(ops.linear(x, weight), ops.linear(x, new), rtol=0, atol=0)


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


# -- the doors: quantize="int8" where pipelines are loaded, accelerate, the CLI -------------------

BAD_QUANTIZE = r"quantize: expected None or one of \('int8',\), got 'int4'"
# The small (untrained) default text-to-image pipeline's 8-bit image, int8 against fp32: 1.8e-2
# relative L2 measured (seed 0).
SMALL_IMAGE_BOUND = 3e-2


def _image(pipe):
    return torch.from_numpy(np.asarray(pipe.generate("a red circle", seed=0, progress=False)[0], dtype=np.float64) / 255)


@pytest.mark.usefixtures("one_thread")
def test_pipelines_load_quantized(tmp_path):
    """default_pipeline / fastdiff.generate's get_pipeline and Pipeline.from_pretrained take
    quantize="int8": the UNet is quantized (not the cached float pipeline), the image stays close."""
    plain = default_pipeline("generate", "small")
    quantized = get_pipeline("small", "generate", quantize="int8")
    assert quantized is not plain and not is_quantized(plain.unet) and is_quantized(quantized.unet)
    assert quantized.quantized == "int8" and "int8 weights" in repr(quantized)
    assert not is_quantized(quantized.vae) and not is_quantized(quantized.text_encoder.model)
    reference, image = _image(plain), _image(quantized)
    error = ((image - reference).norm() / reference.norm()).item()
    assert 0 < error <= SMALL_IMAGE_BOUND, f"relative L2 error {error:.2e} of the int8 image"

    save_pipeline(plain, tmp_path / "small")
    loaded = Pipeline.from_pretrained(tmp_path / "small", quantize="int8")
    assert is_quantized(loaded.unet) and torch.equal(_image(loaded), image)


def test_bad_quantize_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=BAD_QUANTIZE):
        Pipeline.from_pretrained(tmp_path / "missing", quantize="int4")  # before looking at the folder
    with pytest.raises(ValueError, match=BAD_QUANTIZE):
        fastdiff.generate("a cat", model="small", quantize="int4")
    with pytest.raises(ValueError, match=BAD_QUANTIZE):
        fastdiff.accelerate(object(), quantize="int4")
    with pytest.raises(ValueError, match=r"quantize: expected None or one of \('int8',\), got True"):
        default_pipeline("edit", "small", quantize=True)


def test_cli_quantize_flag(tmp_path, capsys):
    out = tmp_path / "int8.png"
    assert cli.main(["generate", "a cat", "-o", str(out), "--model", "small", "--quantize", "int8"]) == 0
    assert Image.open(out).size == (default_pipeline("generate", "small").defaults.size,) * 2
    assert ", UNet on int8 weights" in capsys.readouterr().out
    for command in (["generate", "a cat"], ["edit", "in.png", "make it blue"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "-o", str(out), "--quantize", "int4"])
        assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    assert cli.main(["edit", str(tmp_path / "in.png"), "make it snowy", "-o", str(out), "--quantize", "int8",
                     "--mgie", "m", "--llava", "l", "--ip2p", "i"]) == 1
    assert "--quantize: not with --mgie" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_accelerate_quantizes_the_unet(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from test_pipeline import SD_SCHEDULER, tiny_parts, tiny_unet

    tokenizer, text_encoder, vae = tiny_parts(tmp_path)
    diffusers.StableDiffusionPipeline(
        unet=tiny_unet(4, 2), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=diffusers.PNDMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(tmp_path / "t2i")

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return torch.from_numpy(pipe("a red cat", num_inference_steps=2, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images).double()

    plain = fastdiff.accelerate(diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "t2i"))
    reference = run(plain)
    assert not is_quantized(plain.unet.model)
    quantized = fastdiff.accelerate(diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "t2i"), quantize="int8")
    assert is_quantized(quantized.unet.model)
    assert ((run(quantized) - reference).norm() / reference.norm()).item() <= SMALL_IMAGE_BOUND
    fastdiff.accelerate(plain, quantize="int8")  # an accelerated pipe is quantized in place
    assert is_quantized(plain.unet.model)
    with pytest.raises(UnsupportedError, match="saving a UNet that fastdiff.accelerate\\(quantize=...\\) quantized"):
        plain.save_pretrained(tmp_path / "saved")
