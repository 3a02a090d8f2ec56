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


# -- pipelines -------------------------------------------------------------------------------------

def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def source(side=32, seed=0, width=None):
    return np.random.default_rng(seed).random((side, width or side, 3))


@pytest.fixture(scope="module")
def editor():
    return default_pipeline("edit", "small")  # an InstructPix2Pix-style UNet2DCondition, 2 levels


@pytest.fixture(scope="module")
def generator():
    return default_pipeline("generate", "small")  # the tiny MobileDiffusion, 3 levels


def test_interval_1_is_the_uncached_image_bit_for_bit(editor, generator):
    edit = dict(steps=4, seed=0, output_type="np", progress=False)
    uncached = editor.edit(source(), "make it snowy", **edit)
    for depth in (1, 2):
        assert np.array_equal(editor.edit(source(), "make it snowy", cache_interval=1, cache_depth=depth, **edit), uncached)
    gen = dict(steps=3, sampler="euler", guidance_scale=3.0, seed=0, output_type="np", progress=False)
    assert np.array_equal(generator.generate("a cat", cache_interval=1, cache_depth=3, **gen),
                          generator.generate("a cat", **gen))


# PSNR to the uncached image. The small editor is untrained, so its bound comes from what it does
# (10 Euler-ancestral steps, 3-way guidance; measured 38.4..46.3 dB over intervals 2-3 and both
# depths), set where a cache gone wrong falls: another seed gives 13 dB, another instruction 28.9 dB.
SMALL_EDITOR_PSNR = 35.0
# The trained default (toyworld) at its 20 steps, intervals 2-3, every depth: measured 34.4..57.3 dB;
# another seed gives ~21 dB. (The untrained small MobileDiffusion is no judge: its near-black output
# is 52 dB from another prompt's.)
TRAINED_PSNR = 30.0


def test_cached_edits_differ_but_stay_close(editor):
    options = dict(steps=10, seed=0, output_type="np", progress=False)
    uncached = editor.edit(source(), "make it snowy", **options)
    for interval in (2, 3):
        for depth in (1, 2):
            cached = editor.edit(source(), "make it snowy", cache_interval=interval, cache_depth=depth, **options)
            assert not np.array_equal(cached, uncached)
            assert psnr(cached, uncached) >= SMALL_EDITOR_PSNR, (interval, depth, psnr(cached, uncached))


def test_trained_default_stays_close_when_cached():
    generate, edit = default_pipeline("generate"), default_pipeline("edit")
    prompt = "a big red circle at the top left on a white background"
    image = generate.generate(prompt, seed=0, progress=False)[0]
    runs = {"generate": lambda **o: generate.generate(prompt, seed=0, output_type="np", progress=False, **o)[0],
            "edit": lambda **o: edit.edit(image, "make the circle blue", seed=0, output_type="np", progress=False, **o)}
    for kind, run in runs.items():
        uncached = run()
        pipe = generate if kind == "generate" else edit
        for interval in (2, 3):
            for depth in range(1, pipe.unet.max_cache_depth + 1):
                cached = run(cache_interval=interval, cache_depth=depth)
                assert psnr(cached, uncached) >= TRAINED_PSNR, (kind, interval, depth, psnr(cached, uncached))


def test_bad_cache_values_name_the_field(editor, generator):
    from fastdiff.engine import Engine
    from fastdiff.requests import PipelineError

    for field, value, expected in (("cache_interval", 0, "expected a positive integer"),
                                   ("cache_interval", 2.5, "expected a positive integer"),
                                   ("cache_depth", 0, "expected a positive integer"),
                                   ("cache_depth", 4, r"expected 1..3 \(the outer resolution levels")):
        with pytest.raises(PipelineError, match=f"^{field}: {expected}") as error:
            generator.generate("a cat", steps=2, sampler="euler", progress=False, **{"cache_interval": 2, field: value})
        assert error.value.field == field
    with pytest.raises(PipelineError, match=r"^cache_depth: expected 1..2"):
        editor.edit(source(), "x", steps=2, progress=False, cache_depth=3)  # also with caching off: a wrong value
    with Engine(editor, max_wait_ms=0) as engine, pytest.raises(PipelineError, match=r"^cache_depth: expected 1..2"):
        engine.submit_edit(source(), "x", steps=2, cache_interval=2, cache_depth=3)


# -- the engine: cached and uncached requests in one batch ------------------------------------------

BATCH_INVARIANCE = 1e-4  # as test_engine.py: batched rows agree with alone ones to fp32 rounding

EDITS = [  # guided (3 rows) and unguided (1 row), cached at every depth or not, various steps and samplers
    dict(image=source(32, 0), instruction="make it snowy", steps=6, seed=0, cache_interval=2),
    dict(image=source(32, 1), instruction="add a hat", steps=7, seed=1, cache_interval=3, cache_depth=2),
    dict(image=source(32, 2), instruction="night", steps=5, seed=2),
    dict(image=source(32, 3), instruction="make it red", steps=4, seed=3, guidance_scale=1.0, cache_interval=2),
    dict(image=source(32, 5), instruction="make it snowy", steps=3, seed=5, sampler="dpmpp_2m", cache_interval=1),
    dict(image=source(32, 4), instruction="snow", steps=8, seed=4, sampler="euler", cache_interval=4, cache_depth=1),
]

GENERATIONS = [  # text guidance (2 rows) and none (1 row) on MobileDiffusion's three levels
    dict(prompt="a cat", steps=6, seed=0, sampler="euler", guidance_scale=3.0, cache_interval=2, cache_depth=3),
    dict(prompt="a dog", steps=5, seed=1, sampler="euler_ancestral", guidance_scale=5.0, cache_interval=3),
    dict(prompt="a tree", steps=3, seed=3, sampler="dpmpp_2m", guidance_scale=2.0),
    dict(prompt="a red car", steps=4, seed=2, sampler="ddim", guidance_scale=1.0, cache_interval=2, cache_depth=2),
]


def full_rows(request, rows):
    """Rows through the mid block over a request's run: its rows at every step that refreshes."""
    steps, interval = request["steps"], request.get("cache_interval", 1)
    return rows * len(range(0, steps, interval))


@pytest.mark.parametrize("kind", ["edit", "generate"])
def test_mixed_engine_batch_gives_each_request_its_image_alone(kind, editor, generator):
    from fastdiff.engine import Engine

    pipe, requests = (editor, EDITS) if kind == "edit" else (generator, GENERATIONS)
    rows, handles = count_rows([pipe.unet.mid_block.resnets[0], pipe.unet.down_blocks[0].resnets[0]])
    try:
        # all but the last start together; the last (cached) joins when a slot frees, mid-way through the
        # others' runs, so its refresh steps are its own, not the engine's
        with Engine(pipe, max_batch=len(requests) - 1, max_wait_ms=60_000) as engine:
            submit = engine.submit_edit if kind == "edit" else engine.submit_generate
            futures = [submit(output_type="np", **request) for request in requests]
            results = [f.result(timeout=120) for f in futures]
    finally:
        for handle in handles:
            handle.remove()
    mid, outer = rows[pipe.unet.mid_block.resnets[0]], rows[pipe.unet.down_blocks[0].resnets[0]]
    guided = [1 if r.get("guidance_scale") == 1.0 else (3 if kind == "edit" else 2) for r in requests]
    assert sum(outer) == sum(n * r["steps"] for n, r in zip(guided, requests))
    assert sum(mid) == sum(full_rows(r, n) for n, r in zip(guided, requests))  # the deep part: refreshing rows only
    for request, result in zip(requests, results):
        request = dict(request)
        if kind == "edit":
            alone = editor.edit(request.pop("image"), output_type="np", progress=False, **request)
        else:
            alone = generator.generate(request.pop("prompt"), output_type="np", progress=False, **request)[0]
        diff = float(np.abs(np.asarray(result, np.float64) - alone).max())
        assert diff <= BATCH_INVARIANCE, (request, diff)
