"""MobileDiffusion UNet: fast backends vs the reference backend on the same weights (tiny preset),
the default preset's size and cost budget (counted on the meta device), each config switch
changing the architecture, diffusers-style names, and clear errors for bad inputs."""
import pytest
import torch
import torch.nn as nn

import fastdiff.ops as ops
from fastdiff import MobileDiffusionConfig, MobileDiffusionUNet
from fastdiff.models.layers import SeparableConv2d
from fastdiff.models.mobilediffusion import PRESETS, summarize

from helpers import HAS_CUDA, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, backend_param, device_for, dtypes_for, rel_error

TINY = PRESETS["tiny"]
MODEL_FP32_BOUND = 1e-4  # a whole UNet: errors of ~50 kernels compound


def _random_model(config, seed=0):
    """Default init, then random GroupNorm/LayerNorm affine parameters so that none is trivial."""
    torch.manual_seed(seed)
    model = MobileDiffusionUNet(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    return model.eval()


def _inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    context = torch.randn(batch, config.text_length, config.cross_attention_dim, generator=g)
    return sample, torch.tensor([999.0, 17.0][:batch]), context


def _run(model, inputs, backend, dtype, device="cpu"):
    model = model.to(device=device, dtype=dtype)
    sample, timestep, context = inputs
    with torch.inference_mode(), ops.use_backend(backend):
        return model(sample.to(device, dtype), timestep.to(device), context.to(device, dtype)).float().cpu()


VARIANTS = {
    "default": TINY,
    # separate K/V, ReLU attention, self-attention at 8x8, dense convs, transformers at the top level
    "reverted": TINY.replace(shared_kv=False, relu_attention=True, cross_attention_only=(False, False, True),
                             separable_conv=(False, False, True), transformer_depth=(1, 1, 1)),
}


def _case(backend, variant):
    marks = backend_param(backend).marks  # skipped, with the reason, where the backend cannot run
    return pytest.param(backend, variant, marks=marks, id=f"{backend}-{variant}")


# Triton on a CPU runs in its interpreter (~20 s per model here): the default variant only.
@pytest.mark.parametrize("backend, variant", [
    _case("cpp", "default"), _case("cpp", "reverted"), _case("triton", "default"),
] + ([_case("triton", "reverted")] if HAS_CUDA else []))
def test_fast_backend_matches_reference(backend, variant):
    config = VARIANTS[variant]
    batch = 2
    if backend == "triton" and device_for(backend) == "cpu":  # Triton's interpreter: ~100x slower
        config, batch = config.replace(sample_size=8), 1
    model, inputs = _random_model(config), _inputs(config, batch)
    truth = _run(model, inputs, "reference", torch.float32)
    assert truth.abs().mean() > 0.05, "degenerate test: the reference output is ~0"
    for dtype in dtypes_for(backend):
        out = _run(model, inputs, backend, dtype, device_for(backend))
        assert out.shape == truth.shape and torch.isfinite(out).all()
        error = rel_error(out, truth)
        if dtype == torch.float32:
            bound = MODEL_FP32_BOUND
        else:
            torch_error = rel_error(_run(model, inputs, "reference", dtype), truth)
            bound = max(LOW_PRECISION_FACTOR * torch_error, LOW_PRECISION_FLOOR[dtype])
        assert error <= bound, f"{backend} {dtype}: relative error {error:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_dtype_layout(dtype):
    model = _random_model(TINY).to(dtype)
    sample, _, context = _inputs(TINY, batch=3)
    with torch.inference_mode(), ops.use_backend("reference"):
        out = model(sample.to(dtype), 500, context.to(dtype))
    assert out.shape == sample.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()


def test_timestep_forms_agree():
    model = _random_model(TINY)
    sample, _, context = _inputs(TINY)
    with torch.inference_mode(), ops.use_backend("reference"):
        outs = [model(sample, t, context) for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([250, 250]))]
        other = model(sample, torch.tensor([250, 900]), context)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(other[0], outs[0][0], rtol=0, atol=0)
    assert (other[1] - outs[0][1]).abs().max() > 1e-4, "the timestep does not reach the output"


def test_context_reaches_output():
    model = _random_model(TINY)
    sample, t, context = _inputs(TINY)
    with torch.inference_mode(), ops.use_backend("reference"):
        a = model(sample, t, context)
        b = model(sample, t, context + 0.5 * torch.randn_like(context))
    assert (a - b).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# the default preset's budget, on the meta device (no weights in memory)


def test_default_preset_size_and_cost():
    config = MobileDiffusionConfig.from_preset("mobilediffusion")
    assert config == MobileDiffusionConfig()
    assert (config.sample_size, config.in_channels, config.cross_attention_dim, config.text_length) == (64, 3, 768, 77)
    s = summarize(config)
    assert s.params <= 400e6
    assert abs(s.params - 386e6) <= 0.03 * 386e6, f"{s.params / 1e6:.1f}M parameters, expected 386M +- 3%"
    assert s.total_macs <= 200e9, f"{s.total_macs / 1e9:.1f} G MACs at 512x512 (attention included), budget 200 G"
    assert s.macs["depthwise"] > 0 and s.macs["attention"] > 0


def test_summary_table_adds_up():
    s = MobileDiffusionUNet(TINY).summary(print_table=False)
    assert sum(params for _, _, params, _ in s.rows) == s.params == sum(p.numel() for p in MobileDiffusionUNet(TINY).parameters())
    assert sum(macs for _, _, _, macs in s.rows) == s.total_macs
    text = s.table()
    assert "mid_block" in text and "total" in text and "16x16" in text


def test_summary_prints(capsys):
    MobileDiffusionUNet(TINY).summary()
    assert "GMACs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# each design switch changes the architecture


def _names(config):
    with torch.device("meta"):
        return dict(MobileDiffusionUNet(config).named_parameters())


def test_default_layout_and_diffusers_names():
    config = MobileDiffusionConfig()
    with torch.device("meta"):
        model = MobileDiffusionUNet(config)
    names = dict(model.named_parameters())
    assert config.num_resnets == 12
    assert sum(isinstance(m, nn.Module) and type(m).__name__ == "ResnetBlock2D" for m in model.modules()) == 12
    assert model.down_blocks[0].attentions is None and model.up_blocks[-1].attentions is None  # nothing at 64x64
    for key in [
        "time_embedding.linear_1.weight", "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",  # dense at 64x64
        "down_blocks.1.resnets.0.conv1.depthwise.weight", "down_blocks.1.resnets.0.conv1.pointwise.weight",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_kv.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "mid_block.attentions.0.transformer_blocks.3.attn1.to_kv.weight",
        "mid_block.attentions.4.transformer_blocks.2.ff.net.0.proj.weight",
        "mid_block.attentions.0.proj_in.weight",
        "up_blocks.0.upsamplers.0.conv.weight", "up_blocks.2.resnets.0.conv_shortcut.weight", "conv_out.weight",
    ]:
        assert key in names, key
    # core: 17 full blocks over five gaps; outside: cross-attention only
    assert [len(a.transformer_blocks) for a in model.mid_block.attentions] == [4, 4, 3, 3, 3]
    assert all(b.attn1 is not None for a in model.mid_block.attentions for b in a.transformer_blocks)
    for block in (model.down_blocks[1], model.down_blocks[2], model.up_blocks[0], model.up_blocks[1]):
        assert all(b.attn1 is None and b.attn2 is not None for a in block.attentions for b in a.transformer_blocks)
    assert not any(".to_k." in n or ".to_v." in n for n in names)
    # SwiGLU, expansion 6: 1024 -> 6144 (a, gate) -> 3072 -> 1024
    assert names["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"].shape == (6144, 1024)
    assert names["mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"].shape == (1024, 3072)
    assert names["conv_in.weight"].shape[1] == 3 and names["conv_out.weight"].shape[0] == 3


def test_shared_kv_switch():
    shared, separate = _names(TINY), _names(TINY.replace(shared_kv=False))
    kv = {n for n in shared if ".to_kv." in n}
    assert kv and not any(".to_kv." in n for n in separate)
    assert {n.replace(".to_kv.", ".to_k.") for n in kv} | {n.replace(".to_kv.", ".to_v.") for n in kv} == \
        {n for n in separate if ".to_k." in n or ".to_v." in n}
    assert sum(p.numel() for p in separate.values()) - sum(p.numel() for p in shared.values()) == \
        sum(shared[n].numel() for n in kv)


def test_cross_attention_only_switch():
    base = _names(TINY)
    full = _names(TINY.replace(cross_attention_only=(True, False, True)))
    assert not any(n.startswith("down_blocks.1.") and ".attn1." in n for n in base)
    assert any(n.startswith("down_blocks.1.") and ".attn1." in n for n in full)
    assert any(n.startswith("mid_block.") and ".attn1." in n for n in base)  # the core keeps self-attention


def test_transformer_depth_switch():
    assert not any(n.startswith("down_blocks.0.attentions") for n in _names(TINY))
    top = _names(TINY.replace(transformer_depth=(1, 1, 1)))
    assert any(n.startswith("down_blocks.0.attentions.0.transformer_blocks.0.") for n in top)
    assert any(n.startswith("up_blocks.2.attentions.0.transformer_blocks.0.") for n in top)


def test_ff_expansion_switch():
    dim = TINY.block_out_channels[-1]
    key = "mid_block.attentions.0.transformer_blocks.0.ff.net"
    for expansion in (6, 8):
        names = _names(TINY.replace(ff_expansion=expansion))
        assert names[f"{key}.0.proj.weight"].shape == (expansion * dim, dim)
        assert names[f"{key}.2.weight"].shape == (dim, expansion * dim // 2)


def test_separable_conv_switch():
    with torch.device("meta"):
        sep = MobileDiffusionUNet(TINY)
        dense = MobileDiffusionUNet(TINY.replace(separable_conv=(False, False, False)))
    assert isinstance(sep.down_blocks[1].resnets[0].conv1, SeparableConv2d)
    assert isinstance(sep.mid_block.resnets[0].conv2, SeparableConv2d)
    assert isinstance(sep.down_blocks[0].resnets[0].conv1, nn.Conv2d)
    assert not any(isinstance(m, SeparableConv2d) for m in dense.modules())


def test_residual_block_count_switch():
    sd_like = TINY.replace(down_layers=(2, 2, 2), up_layers=(3, 3, 3), mid_layers=7)
    assert sd_like.num_resnets == 22
    with torch.device("meta"):
        model = MobileDiffusionUNet(sd_like)
    assert sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules()) == 22
    model, inputs = _random_model(sd_like), _inputs(sd_like)
    with torch.inference_mode(), ops.use_backend("reference"):
        assert model(*inputs).shape == inputs[0].shape  # skips pair up with extra up layers


def test_relu_attention_switch():
    softmax_model = _random_model(TINY)
    relu_model = MobileDiffusionUNet(TINY.replace(relu_attention=True))
    relu_model.load_state_dict(softmax_model.state_dict())  # same parameters: only the attention kind differs
    kinds = {m.kind for m in relu_model.modules() if type(m).__name__ == "Attention"}
    assert kinds == {"relu"}
    inputs = _inputs(TINY)
    with torch.inference_mode(), ops.use_backend("reference"):
        assert (softmax_model(*inputs) - relu_model(*inputs)).abs().max() > 1e-4


def test_latent_channels():
    names = _names(TINY.replace(in_channels=4, out_channels=4))
    assert names["conv_in.weight"].shape[1] == 4 and names["conv_out.weight"].shape[0] == 4


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("change, message", [
    (dict(block_out_channels=(32, 48)), "down_layers: expected a tuple with one entry per level"),
    (dict(down_layers=(2, 1, 1)), "down_layers/up_layers: level 0"),
    (dict(block_out_channels=(32, 40, 64)), "block_out_channels: 40 must be a multiple"),
    (dict(ff_expansion=5), "ff_expansion"),
    (dict(ff_activation="relu"), "ff_activation"),
    (dict(mid_layers=1), "mid_transformer_depth"),
    (dict(sample_size=18), "sample_size: must be divisible by 4"),
    (dict(attention_head_dim=0), "attention_head_dim: expected a positive int"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


def test_bad_preset_and_config_type():
    with pytest.raises(ValueError, match="name: expected one of"):
        MobileDiffusionConfig.from_preset("sd15")
    with pytest.raises(TypeError, match="config: expected a MobileDiffusionConfig"):
        MobileDiffusionUNet({"sample_size": 64})


def test_bad_inputs():
    """The rule is ConditionalUNet's, shared with UNet2DCondition (tests/test_unet_interface.py)."""
    model = _random_model(TINY)
    sample, t, context = _inputs(TINY)
    cases = [
        ((sample[0], t, context), ValueError, r"sample: expected shape \(B, 3, H, W\)"),
        ((sample[:, :2], t, context), ValueError, "sample: expected shape"),
        ((sample, t, context[..., :16]), ValueError, r"encoder_hidden_states: expected shape \(2, L, 32\)"),
        ((sample, t, context[:1]), ValueError, "encoder_hidden_states: expected shape"),
        ((sample, torch.tensor([1, 2, 3]), context), ValueError, "timestep: expected"),
        ((sample, "999", context), TypeError, "timestep: expected a number or a tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message), ops.use_backend("reference"):
            model(*args)


@pytest.mark.parametrize("hw", [(14, 14), (13, 9)])
def test_sizes_off_the_level_grid_come_back_at_their_size(hw):
    """Maps not divisible by 4 (3 levels): downsampling rounds up, upsampling returns to each skip's
    size, as in diffusers' UNet."""
    model = _random_model(TINY)
    sample, t, context = _inputs(TINY)
    with torch.inference_mode(), ops.use_backend("reference"):
        out = model(sample[..., :hw[0], :hw[1]], t, context)
    assert out.shape == (2, 3, *hw) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_head_size_outside_the_kernels_runs_on_the_reference(backend):
    """attention_head_dim 4 (< 8, which the kernels take at the least): the model runs, its attention
    on the reference twin with one warning, and matches the reference backend."""
    ops.reset_warnings()
    config = TINY.replace(attention_head_dim=4)
    model, inputs = _random_model(config), _inputs(config)
    truth = _run(model, inputs, "reference", torch.float32)
    with pytest.warns(RuntimeWarning, match="head dim 4 is outside the fast kernels' 8..256") as record:
        out = _run(model, inputs, backend, torch.float32)
    assert sum("head dim" in str(w.message) for w in record) == 1
    assert rel_error(out, truth) <= MODEL_FP32_BOUND


# ----------------------------------------------------------------------------------------------
# the ablation table (python -m fastdiff.bench ablations)


def test_ablation_rows_each_revert_a_choice():
    from fastdiff.bench.ablations import variants

    rows = variants(MobileDiffusionConfig())
    base = rows[0][1]
    assert base == MobileDiffusionConfig()
    base_params = {n: tuple(p.shape) for n, p in _names(base).items()}
    for name, config, _ in rows[1:]:
        assert config != base, name
        params = {n: tuple(p.shape) for n, p in _names(config).items()}
        if name.startswith("ReLU"):
            assert params == base_params  # same weights, another attention kind
        else:
            assert params != base_params, f"{name}: same architecture as the default"
    assert dict((n, c.num_resnets) for n, c, _ in rows)["22 residual blocks"] == 22


def test_ablation_cli_without_latency(tmp_path, capsys):
    import json

    from fastdiff.bench.__main__ import main

    out = tmp_path / "ablations.json"
    assert main(["ablations", "--preset", "tiny", "--res", "64", "--no-latency", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "22 residual blocks" in table and "cost -26%" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and rows[0]["variant"].startswith("MobileDiffusion")
    assert all(r["macs"] > 0 and r["params"] > 0 and "latency_ms" not in r for r in rows)
