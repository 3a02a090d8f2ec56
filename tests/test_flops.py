"""MAC counter: hand-computed counts for each category, meta == real tensors, per-module
attribution, and SD1.5's UNet (built on the meta device) against its published 339 G MACs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.models.flops import count_macs, count_params


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(5, 12, 3, padding=1)
        self.strided = nn.Conv2d(12, 8, 3, stride=2, padding=1, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.depthwise(self.strided(self.dense(x)))


def test_convolutions():
    x = torch.randn(3, 5, 14, 10)
    count = count_macs(_Convs(), x)
    dense = 3 * 14 * 10 * 12 * 5 * 9
    strided = 3 * 7 * 5 * 8 * 12 * 9
    depthwise = 3 * 7 * 5 * 8 * 9
    assert count.macs == {"conv": dense + strided, "depthwise": depthwise, "linear": 0, "attention": 0}
    assert count.module("dense")["conv"] == dense and count.module("depthwise")["depthwise"] == depthwise
    assert count.module("")["conv"] == dense + strided
    assert count.params == count_params(_Convs()) == (12 * 5 * 9 + 12) + 8 * 12 * 9 + (8 * 9 + 8)


def test_separable_conv_op_counts_both_halves():
    x = torch.randn(2, 6, 9, 7)
    dw, pw = torch.randn(6, 1, 3, 3), torch.randn(11, 6, 1, 1)

    class Sep(nn.Module):
        def forward(self, x):
            return ops.separable_conv2d(x, dw, None, pw, None)

    count = count_macs(Sep(), x)
    assert count.macs["depthwise"] == 2 * 9 * 7 * 6 * 9
    assert count.macs["conv"] == 2 * 9 * 7 * 11 * 6


@pytest.mark.parametrize("shared_kv", [True, False])
def test_linear_and_attention(shared_kv):
    B, Lq, Lk, H, D = 2, 37, 11, 3, 40

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(H * D, H * D)

        def forward(self, x, k, v):
            q = self.to_q(x).view(B, Lq, H, D)
            return ops.attention(q, k, None if shared_kv else v, kind="relu")

    x, k, v = torch.randn(B, Lq, H * D), torch.randn(B, Lk, H, D), torch.randn(B, Lk, H, D)
    count = count_macs(Attn(), x, k, v)
    assert count.macs["linear"] == B * Lq * (H * D) ** 2
    assert count.macs["attention"] == 2 * B * H * Lq * Lk * D  # Q·Kᵀ and P·V
    assert count.total == count.module_macs + count.macs["attention"]


def test_torch_sdpa_is_counted():
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 24)

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    assert count_macs(Sdpa(), q, k, v).macs["attention"] == 2 * 4 * 33 * 20 * (16 + 24)


def test_counts_on_meta_equal_counts_on_real_tensors():
    from fastdiff.models.mobilediffusion import PRESETS, MobileDiffusionUNet, build_meta

    config = PRESETS["tiny"]
    meta_model, meta_inputs = build_meta(config, batch_size=2)
    real_inputs = [torch.randn(t.shape) for t in meta_inputs]
    meta = count_macs(meta_model, *meta_inputs)
    with ops.use_backend("cpp"):  # the counter switches to the reference ops whatever is forced outside
        real = count_macs(MobileDiffusionUNet(config), *real_inputs)
    assert meta.macs == real.macs and meta.params == real.params
    assert meta.by_module == real.by_module
    assert all(v > 0 for v in meta.macs.values())


def test_counts_in_inference_mode_equal_counts_outside():
    """A model and inputs made in inference mode are counted in full (ops whose every input is an
    inference tensor would escape the counter)."""
    from fastdiff.models.mobilediffusion import PRESETS, build_meta

    model, inputs = build_meta(PRESETS["tiny"], batch_size=1)
    outside = count_macs(model, *inputs)
    with torch.inference_mode():
        model, inputs = build_meta(PRESETS["tiny"], batch_size=1)
        inside = count_macs(model, *inputs)
    assert inside.macs == outside.macs


def _sd15_attention_macs():
    """The two attention matmuls of SD1.5's 16 transformer blocks at 512x512, by hand:
    self-attention 2·L²·C, cross-attention 2·L·77·C (C = heads·head_dim = the level's channels)."""
    levels = [(64 * 64, 320, 5), (32 * 32, 640, 5), (16 * 16, 1280, 5), (8 * 8, 1280, 1)]  # (L, C, blocks)
    return sum(n * (2 * L * L * C + 2 * L * 77 * C) for L, C, n in levels)


def _sd15_diffusers_count():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768,
        )
        inputs = (torch.empty(1, 4, 64, 64), torch.tensor([500]), torch.empty(1, 77, 768))
    return count_macs(unet, *inputs)


def test_sd15_unet():
    count = _sd15_diffusers_count()
    assert count.params == 859_520_964  # SD1.5's UNet
    # Published figure (conv + linear layers, as module-hook counters see them): 339 G.
    assert count.module_macs == pytest.approx(339e9, rel=0.01)
    assert count.macs["attention"] == _sd15_attention_macs()  # + 63.0 G -> 401.6 G in all
    assert count.module("mid_block")["attention"] == 2 * 64 * 64 * 1280 + 2 * 64 * 77 * 1280


def test_fastdiff_sd15_unet_counts_like_diffusers():
    from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig

    with torch.device("meta"):
        unet = UNet2DCondition(UNet2DConditionConfig(cross_attention_dim=768))  # SD1.5
        inputs = (torch.empty(1, 4, 64, 64), torch.tensor([500.0]), torch.empty(1, 77, 768))
    count, theirs = count_macs(unet, *inputs), _sd15_diffusers_count()
    assert count.params == theirs.params
    # proj_in/proj_out run as GEMMs on channels_last tokens here (1x1 convs in diffusers): the
    # conv/linear split moves, the sum does not.
    assert count.module_macs == theirs.module_macs and count.macs["attention"] == theirs.macs["attention"]
