"""DeepCache (step caching) in both UNets, the pipelines, the Engine, MGIE and HTTP.

Model level: a row that refreshes runs the whole UNet (bit-identical to a plain call) and keeps the
input of the up block at its depth; a row that reuses runs only its outer levels (counted with
hooks on the deep blocks); features kept from the same inputs give the full output back, so the
split is exact, and features of another row change it, so they are really used.
Pipeline level: interval 1 is the uncached image bit for bit; interval N > 1 differs but stays
close (PSNR bounds below, with what they were measured at); a mixed Engine batch gives each
request the image it gets alone.
"""
import numpy as np
import pytest
import torch

from fastdiff import MobileDiffusionUNet
from fastdiff.default_model import default_pipeline
from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig
from fastdiff.models.unet_common import DeepCacheRows

pytestmark = pytest.mark.usefixtures("one_thread")

REUSE_SAME_INPUTS = 1e-5  # the same features back in: only GEMM blocking for other row counts differs


def sd_unet(mid=True, seed=0):
    """A 3-level SD-style UNet with 2 resnets per level, cross-attention at the two outer levels."""
    torch.manual_seed(seed)
    config = UNet2DConditionConfig(
        in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid else None,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    return UNet2DCondition(config).eval()


def md_unet(seed=0):
    torch.manual_seed(seed)
    return MobileDiffusionUNet.from_preset("tiny").eval()


UNETS = {"mobilediffusion": md_unet, "sd": sd_unet}


def inputs(unet, batch=4, size=(15, 17), seed=1):
    """Odd sizes: the up blocks upsample to their skip's size."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.in_channels, *size, generator=g)
    timesteps = torch.tensor([10.0, 500.0, 900.0, 3.0][:batch])
    return sample, timesteps, torch.randn(batch, 7, unet.cross_attention_dim, generator=g)


def deep_blocks(unet, depth):
    """The modules a row cached at `depth` must not run: mid block, down and up blocks below."""
    levels = unet.num_levels
    blocks = [unet.mid_block.resnets[0]] if unet.mid_block is not None else []
    blocks += [unet.down_blocks[level].resnets[0] for level in range(depth, levels)]
    blocks += [unet.up_blocks[levels - 1 - level].resnets[0] for level in range(depth, levels)]
    return blocks


def count_rows(modules):
    """Rows through each module per call, as a list per module, while the context is open."""
    rows = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda module, args: rows[module].append(args[0].shape[0])) for m in modules]
    return rows, handles


@pytest.mark.parametrize("name", UNETS)
def test_refresh_is_the_plain_call_and_reuse_skips_the_deep_part(name):
    unet = UNETS[name]()
    x, t, context = inputs(unet)
    full = unet(x, t, context)
    for depth in range(1, unet.max_cache_depth + 1):
        depths = [depth, None, depth, 1]
        refresh = DeepCacheRows(depths, [None] * 4)
        assert torch.equal(unet(x, t, context, cache=refresh), full)  # same rows, same blocks: bit for bit
        stored = refresh.stored
        assert stored[1] is None and all(s.shape[0] == 1 for s in stored if s is not None)

        reuse = DeepCacheRows(depths, [stored[0], None, None, stored[3]])
        outer, deeper = unet.down_blocks[0].resnets[0], deep_blocks(unet, depth)
        between = [unet.down_blocks[level].resnets[0] for level in range(1, depth)]  # row 3 (depth 1) stops above
        rows, handles = count_rows([outer, *between, *deeper])
        try:
            same = unet(x, t, context, cache=reuse)
        finally:
            for handle in handles:
                handle.remove()
        assert rows[outer] == [4]  # the outermost level runs for every row
        assert all(rows[block] == [3] for block in between), rows
        assert all(rows[block] == [2] for block in deeper), rows  # the deep part: only rows 1 and 2
        assert float((same - full).abs().max()) <= REUSE_SAME_INPUTS  # the split is exact
        assert reuse.stored[2] is not None and torch.equal(reuse.stored[2], stored[2])

        swapped = unet(x, t, context, cache=DeepCacheRows(depths, [stored[2], None, None, stored[3]]))
        assert float((swapped[0] - full[0]).abs().max()) > 1e-2  # row 0 takes row 2's deep features
        assert float((swapped[1:] - full[1:]).abs().max()) <= REUSE_SAME_INPUTS


def test_sd_without_mid_block_caches_all_but_the_deepest_level():
    unet = sd_unet(mid=False)
    assert unet.max_cache_depth == unet.num_levels - 1
    x, t, context = inputs(unet, batch=2)
    refresh = DeepCacheRows([2, 2], [None, None])
    full = unet(x, t, context, cache=refresh)
    same = unet(x, t, context, cache=DeepCacheRows([2, 2], [refresh.stored[0], None]))
    assert float((same - full).abs().max()) <= REUSE_SAME_INPUTS
    with pytest.raises(ValueError, match=r"cache.depths\[0\]: expected None or an int in 1..2"):
        unet(x, t, context, cache=DeepCacheRows([3, None], [None, None]))


def test_bad_cache_rows_are_named():
    unet = md_unet()
    x, t, context = inputs(unet, batch=2, size=(16, 16))
    with pytest.raises(ValueError, match="cache: expected depths and reuse for each of the 2 rows"):
        unet(x, t, context, cache=DeepCacheRows([1], [None]))
    with pytest.raises(ValueError, match=r"cache.depths\[1\]: expected None or an int in 1..3"):
        unet(x, t, context, cache=DeepCacheRows([1, 4], [None, None]))
    with pytest.raises(ValueError, match=r"cache.reuse\[0\]: expected None or a \(1, C, h, w\) tensor for a row with a depth"):
        unet(x, t, context, cache=DeepCacheRows([None, 1], [torch.zeros(1, 48, 16, 16), None]))
    with pytest.raises(ValueError, match=r"cache.reuse\[0\]: expected shape \(1, 48, 16, 16\)"):
        unet(x, t, context, cache=DeepCacheRows([1, 1], [torch.zeros(1, 48, 8, 8), None]))
    sd = sd_unet()
    with pytest.raises(ValueError, match="cache: not with ControlNet residuals"):
        sd(*inputs(sd, batch=1), cache=DeepCacheRows([1], [None]), mid_block_additional_residual=torch.zeros(1))
