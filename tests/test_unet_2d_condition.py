"""fastdiff.UNet2DCondition against diffusers' UNet2DConditionModel with the same random weights.

Tiny configs covering the SD-family variants (in_channels 4/8/9, heads as int or per block,
conv or linear projections, stacked transformer layers, upcast attention, cross-attention-only
blocks, odd latent sizes, per-sample timesteps); fp32 and bf16; on the C++ and reference backends.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffusers import UNet2DConditionModel

import fastdiff.ops as ops
from fastdiff import UNet2DCondition
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.unet_2d_condition import UNet2DConditionConfig
from helpers import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, backend_param, rel_error

FP32_MODEL_BOUND = 1e-4  # whole-UNet fp32 bound (dozens of ops, each within 1e-5 of float64)
BACKENDS = [backend_param("cpp"), backend_param("reference")]
REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=16,
)
THREE_LEVELS = dict(
    block_out_channels=(32, 48, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# name: (config overrides, latent (H, W), timestep kind)
VARIANTS = {
    "sd15-like": (dict(), (16, 16), "int"),
    "ip2p-linear-tuple-heads": (
        dict(in_channels=8, attention_head_dim=(2, 4), use_linear_projection=True, layers_per_block=2,
             transformer_layers_per_block=2, cross_attention_dim=48), (24, 40), "per-sample"),
    "inpaint-upcast-odd": (
        dict(in_channels=9, upcast_attention=True, only_cross_attention=(True, False, False), norm_num_groups=16,
             **THREE_LEVELS), (13, 19), "0-d"),
    "sd2-like-shifted-time": (
        dict(attention_head_dim=(4, 8), use_linear_projection=True, cross_attention_dim=64, flip_sin_to_cos=False,
             freq_shift=1, center_input_sample=True, time_embedding_dim=96, mid_block_scale_factor=0.75,
             transformer_layers_per_block=(1, 2)), (24, 40), "float"),
    "no-mid-block": (dict(mid_block_type=None, layers_per_block=(1, 2)), (8, 12), "int"),
}


def make_diffusers_unet(seed=0, **overrides):
    """A diffusers UNet with random weights scaled so activations stay O(1) (no zero-init layers)."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) * fan_in**-0.5)
    return model


def make_inputs(model, hw, timestep_kind, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, model.config.in_channels, *hw, generator=g)
    context = torch.randn(batch, 7, model.config.cross_attention_dim, generator=g)
    timestep = {"int": 981, "float": 499.5, "0-d": torch.tensor(250), "per-sample": torch.tensor([3.0, 700.0])}[timestep_kind]
    return sample, timestep, context


def run(unet, backend, *args):
    with ops.use_backend(backend), ops.poison_outputs():
        out = unet(*args)
    assert torch.isfinite(out).all(), f"[{backend}] output has NaN/inf"
    return out


def reference_output(unet):
    sample, timestep, context = make_inputs(unet, (16, 16), "per-sample")
    with ops.use_backend("reference"):
        return unet(sample, timestep, context)


@pytest.fixture(scope="module")
def tiny():
    """(diffusers model, fastdiff model from it, the fastdiff model's output)."""
    ref = make_diffusers_unet()
    unet = UNet2DCondition.from_diffusers(ref)
    return ref, unet, reference_output(unet)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    overrides, hw, timestep_kind = VARIANTS[request.param]
    ref = make_diffusers_unet(**overrides)
    inputs = make_inputs(ref, hw, timestep_kind)
    with torch.no_grad():
        expected = ref(*inputs).sample
    return request.param, ref, inputs, expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_diffusers(variant, backend):
    name, ref, inputs, expected = variant
    unet = UNet2DCondition.from_diffusers(ref)
    out = run(unet, backend, *inputs)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = rel_error(out, expected)
    assert err <= FP32_MODEL_BOUND, f"{name} [{backend}]: relative error {err:.2e} > {FP32_MODEL_BOUND:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sd15-like", "inpaint-upcast-odd"])
def test_bf16_within_twice_diffusers_autocast_error(name, backend):
    overrides, hw, timestep_kind = VARIANTS[name]
    ref = make_diffusers_unet(**overrides)
    inputs = make_inputs(ref, hw, timestep_kind)
    with torch.no_grad():
        expected = ref(*inputs).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_err = rel_error(ref(*inputs).sample, expected)
    unet = UNet2DCondition.from_diffusers(ref, dtype=torch.bfloat16)
    out = run(unet, backend, *inputs)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    bound = max(LOW_PRECISION_FACTOR * autocast_err, LOW_PRECISION_FLOOR[torch.bfloat16])
    err = rel_error(out, expected)
    assert err <= bound, \
        f"{name} [{backend}] bf16: relative error {err:.2e} > {bound:.2e} (diffusers autocast: {autocast_err:.2e})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activations_stay_channels_last_in_model_dtype(tiny, backend, dtype):
    ref, unet, _ = tiny
    unet = UNet2DCondition.from_diffusers(ref, dtype=dtype)
    seen = []

    def check(module, args, out):
        seen.append(type(module).__name__)
        assert out.dtype == dtype, f"{type(module).__name__}: output dtype {out.dtype}"
        assert out.is_contiguous(memory_format=torch.channels_last), f"{type(module).__name__}: not channels_last"

    for m in unet.modules():
        if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D", "Conv2d"):
            m.register_forward_hook(check)
    run(unet, backend, *make_inputs(ref, (16, 16), "int"))
    assert {"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"} <= set(seen)


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_head_sizes_the_kernels_do_not_cover_match_diffusers(backend):
    """Head size 4 (diffusers' own tiny test configs) and 288 (> 256, one head over a 288-channel
    mid block): a valid diffusers config runs, those attention calls on the reference op with one
    warning per head size, and the output still matches diffusers."""
    ops.reset_warnings()
    ref = make_diffusers_unet(block_out_channels=(32, 288), attention_head_dim=(8, 1))
    inputs = make_inputs(ref, (8, 8), "per-sample")
    with torch.no_grad():
        expected = ref(*inputs).sample
    unet = UNet2DCondition.from_diffusers(ref)
    assert {m.dim_head for m in unet.modules() if type(m).__name__ == "Attention"} == {4, 288}
    with warnings.catch_warnings(record=True) as record, ops.use_backend(backend):
        warnings.simplefilter("always")
        out = unet(*inputs)
        again = unet(*inputs)
    messages = sorted(str(w.message) for w in record if "head dim" in str(w.message))
    assert len(messages) == 2, messages  # once per head size, not per call
    assert "head dim 288 is outside the fast kernels' 8..256" in messages[0]
    assert "head dim 4 is outside the fast kernels' 8..256" in messages[1]
    assert torch.equal(out, again)
    err = rel_error(out, expected)
    assert err <= FP32_MODEL_BOUND, f"relative error {err:.2e} > {FP32_MODEL_BOUND:.0e}"


def test_timestep_forms_agree(tiny):
    ref, unet, _ = tiny
    sample, _, context = make_inputs(ref, (16, 16), "int")
    with ops.use_backend("reference"):
        scalar = unet(sample, 500, context)
        zero_d = unet(sample, torch.tensor(500.0), context)
        per_sample = unet(sample, torch.tensor([500, 500]), context)
        mixed = unet(sample, torch.tensor([500, 20]), context)
    assert torch.equal(scalar, zero_d) and torch.equal(scalar, per_sample)
    assert torch.equal(mixed[0], scalar[0]) and not torch.allclose(mixed[1], scalar[1])


# ----------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("layout", ["safetensors", "bin", "pipeline-folder"])
def test_from_folder_matches_in_memory(tiny, tmp_path, layout):
    ref, _, expected = tiny
    folder = tmp_path / "unet" if layout == "pipeline-folder" else tmp_path
    ref.save_pretrained(folder, safe_serialization=layout != "bin")
    expected_file = "diffusion_pytorch_model.bin" if layout == "bin" else "diffusion_pytorch_model.safetensors"
    assert (folder / expected_file).is_file()
    loaded = UNet2DCondition.from_diffusers(tmp_path)
    assert torch.equal(reference_output(loaded), expected)


def test_from_folder_does_not_import_diffusers(tiny, tmp_path):
    ref = tiny[0]
    ref.save_pretrained(tmp_path)
    code = (
        "import sys, torch\n"
        "from fastdiff import UNet2DCondition\n"
        f"unet = UNet2DCondition.from_diffusers({str(tmp_path)!r}, dtype=torch.bfloat16)\n"
        "assert unet.dtype == torch.bfloat16\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'))\n"
        "assert not leaked, leaked\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_from_diffusers_shares_or_converts_weights(tiny):
    ref, unet, _ = tiny
    linear = "time_embedding.linear_1.weight"
    assert unet.state_dict()[linear].data_ptr() == ref.state_dict()[linear].data_ptr()  # same dtype: shared
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    bf16 = UNet2DCondition.from_diffusers(ref, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.conv_in.weight, ref.conv_in.weight.bfloat16())


@pytest.mark.parametrize("wrapping", ["plain", "module-prefix", "unet-prefix", "state_dict-wrapper"])
def test_mgie_style_pt_state_dict_loads(tiny, tmp_path, wrapping):
    ref, _, expected = tiny
    state = ref.state_dict()
    state = {
        "plain": state,
        "module-prefix": {f"module.{k}": v for k, v in state.items()},
        "unet-prefix": {f"unet.{k}": v for k, v in state.items()},
        "state_dict-wrapper": {"state_dict": state, "epoch": 3},
    }[wrapping]
    torch.save(state, tmp_path / "unet.pt")
    fresh = UNet2DCondition(UNet2DConditionConfig.from_diffusers(dict(ref.config)))
    fresh.load_state_dict(torch.load(tmp_path / "unet.pt", weights_only=True))
    assert torch.equal(reference_output(fresh), expected)
    other = UNet2DCondition(UNet2DConditionConfig.from_diffusers(dict(ref.config))).load_weights(tmp_path / "unet.pt")
    assert torch.equal(reference_output(other), expected)


def test_missing_unexpected_and_misshapen_keys_are_listed(tiny):
    ref, unet, _ = tiny
    state = dict(ref.state_dict())
    del state["conv_in.bias"], state["mid_block.attentions.0.proj_in.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(5, 32, 3, 3)
    with pytest.raises(CheckpointError) as info:
        unet.load_state_dict(state)
    message = str(info.value)
    assert "2 missing keys" in message and "conv_in.bias" in message and "mid_block.attentions.0.proj_in.weight" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "conv_out.weight (checkpoint (5, 32, 3, 3), UNet2DCondition (4, 32, 3, 3))" in message


def test_many_missing_keys_are_counted_and_truncated(tiny):
    unet = tiny[1]
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("up_blocks.")}
    with pytest.raises(CheckpointError, match=r"\d+ missing keys: .*, \.\.\. \(\d+ more\)"):
        unet.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# config and input validation


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("num_attention_heads", 8),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("act_fn", "gelu"),
    ("some_future_field", 1),
])
def test_unsupported_config_field_is_named(tiny, field, value):
    config = {**dict(tiny[0].config), field: value}
    with pytest.raises(ValueError, match=field):
        UNet2DConditionConfig.from_diffusers(config)


def test_ignored_fields_and_defaults_are_accepted(tiny):
    config = {**dict(tiny[0].config), "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
              "sample_size": 64, "dropout": 0.1}
    assert UNet2DConditionConfig.from_diffusers(config).block_out_channels == (32, 64)


@pytest.mark.parametrize("heads", [4, (2, 4), (4, 8)])
def test_heads_are_resolved_like_diffusers(heads):
    """attention_head_dim is the number of heads; it does not change parameter shapes, so the
    outputs alone could miss a wrong split: compare every attention module's head count."""
    ref = make_diffusers_unet(attention_head_dim=heads)
    unet = UNet2DCondition.from_diffusers(ref)
    theirs = dict(ref.named_modules())
    ours = {name: m for name, m in unet.named_modules() if type(m).__name__ == "Attention"}
    assert len(ours) == 8  # TINY: (1 down + 1 mid + 2 up transformers) x (attn1, attn2)
    for name, attn in ours.items():
        assert (attn.heads, attn.heads * attn.dim_head) == (theirs[name].heads, theirs[name].inner_dim), name


def test_head_counts_are_checked_only_where_attention_runs():
    """Block 0 (a DownBlock2D / UpBlock2D pair) has no attention: its head count is not used, as in
    diffusers; an attention block's head size is floored (13 for 40 channels in 3 heads). Only a
    head size of 0, which diffusers cannot build either, is refused."""
    blocks = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    UNet2DConditionConfig(block_out_channels=(4, 8), attention_head_dim=8, norm_num_groups=1, **blocks)
    UNet2DConditionConfig(block_out_channels=(32, 40), attention_head_dim=3, norm_num_groups=8, **blocks)
    with pytest.raises(ValueError, match="block 1 has attention over 8 channels, which cannot make 16 heads"):
        UNet2DConditionConfig(block_out_channels=(4, 8), attention_head_dim=(64, 16), norm_num_groups=1, **blocks)
    with pytest.raises(ValueError, match="block 0 has attention over 4 channels, which cannot make 0 heads"):
        UNet2DConditionConfig(block_out_channels=(4, 8), attention_head_dim=0, norm_num_groups=1,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None)


@pytest.mark.parametrize("args, error, match", [
    (lambda s, t, c: (s[:, :3], t, c), ValueError, r"sample: expected shape \(B, 4, H, W\) \(config in_channels 4\)"),
    (lambda s, t, c: (s[0], t, c), ValueError, "sample: expected shape"),
    (lambda s, t, c: (s, t, c[..., :16]), ValueError, "encoder_hidden_states: expected shape"),
    (lambda s, t, c: (s, t, c[:1]), ValueError, "encoder_hidden_states: expected shape"),
    (lambda s, t, c: (s, torch.tensor([1, 2, 3]), c), ValueError, "timestep"),
    (lambda s, t, c: (s, "10", c), TypeError, "timestep"),
])
def test_bad_inputs_raise_clear_errors(tiny, args, error, match):
    ref, unet, _ = tiny
    sample, timestep, context = make_inputs(ref, (16, 16), "int")
    with pytest.raises(error, match=match):
        unet(*args(sample, timestep, context))
