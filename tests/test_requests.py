"""Requests as values and the door they pass: guidance layouts, dtype names, the pixel limit,
non-finite inputs and weights, oversized images. Runs on the embedded small models."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.default_model import default_pipeline
from fastdiff.requests import (DEFAULT_MAX_PIXELS, EditGuidance, EditRequest, GenerateRequest, NoGuidance, PipelineError,
                               TextGuidance, resolve_dtype)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator():
    return default_pipeline("generate", "small")


@pytest.fixture(scope="module")
def editor():
    return default_pipeline("edit", "small")


@pytest.fixture
def no_model_runs(generator, editor):
    """Fails the test if any UNet, VAE or text encoder runs inside it."""
    calls = []
    modules = [generator.unet, generator.vae, generator.text_encoder.model, editor.unet, editor.vae]
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__)) for m in modules]
    yield calls
    for handle in handles:
        handle.remove()
    assert not calls, f"models ran for a request refused at the door: {calls}"


def image(side=32, seed=0):
    return np.random.default_rng(seed).random((side, side, 3))


# -- guidance: the row layout and the combine are one object ------------------------------------

def test_guidance_layouts_follow_diffusers_row_order():
    text, null = torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 0.0)
    assert TextGuidance(7.5).context(text, null)[:, 0, 0].tolist() == [0.0, 1.0]  # [uncond, text]
    assert EditGuidance(7.5, 1.5).context(text, null)[:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # [text, image, uncond]
    latents = torch.ones(1, 4, 2, 2)
    assert EditGuidance(7.5, 1.5).image_latents(latents)[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]
    assert NoGuidance().context(text, None).shape == (1, 2, 3)


def test_guidance_combines_its_own_rows():
    uncond, cond, image_only = (torch.randn(1, 4, 3, 3) for _ in range(3))
    g, g_img = 7.5, 1.5
    text = TextGuidance(g).combine(torch.cat([uncond, cond]))
    torch.testing.assert_close(text, uncond + g * (cond - uncond))
    edit = EditGuidance(g, g_img).combine(torch.cat([cond, image_only, uncond]))
    torch.testing.assert_close(edit, uncond + g * (cond - image_only) + g_img * (image_only - uncond))
    assert NoGuidance().combine(cond) is cond


# -- request values ----------------------------------------------------------------------------

def test_a_request_is_a_frozen_value_with_its_seed_drawn_once():
    request = GenerateRequest(prompt="a cat")
    assert isinstance(request.seed, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3
    assert dataclasses.replace(request, steps=3).seed == request.seed


def test_run_takes_a_request_and_matches_the_keyword_call(generator):
    request = GenerateRequest(prompt="a cat", steps=2, seed=4, sampler="euler", output_type="np")
    by_value = generator.run(request, progress=False)
    by_keywords = generator.generate("a cat", steps=2, seed=4, sampler="euler", output_type="np", progress=False)
    np.testing.assert_array_equal(by_value, by_keywords)


def test_unknown_keywords_name_themselves(generator, editor):
    with pytest.raises(PipelineError, match=r"^stepz: not an argument of GenerateRequest"):
        generator.generate("a cat", stepz=3)
    with pytest.raises(PipelineError, match=r"^height: not an argument of EditRequest"):
        editor.edit(image(), "snow", height=64)
    with pytest.raises(PipelineError, match=r"^stepz: not an argument"):
        fastdiff.generate("a cat", model="small", stepz=3)


# -- dtype at the door -------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                         ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                                         (torch.bfloat16, torch.bfloat16), (None, torch.float32)])
def test_dtype_names_resolve(name, dtype):
    assert resolve_dtype(name) == dtype


def test_dtypes_the_device_cannot_run_are_refused():
    with pytest.raises(PipelineError, match="^dtype: float16 does not run on cpu"):
        resolve_dtype("fp16")
    with pytest.raises(PipelineError, match="^dtype: expected a torch.dtype or one of"):
        resolve_dtype("half-ish")
    with pytest.raises(PipelineError, match="^dtype: .*does not run on cpu"):
        resolve_dtype(torch.int8)
    assert resolve_dtype("fp16", "cuda") == torch.float16  # checked without a GPU: a fact of the table


def test_module_api_takes_dtype_names():
    image_bf16 = fastdiff.generate("a cat", model="small", dtype="bf16", steps=1, seed=0, progress=False)[0]
    assert image_bf16.size == (128, 128)
    with pytest.raises(PipelineError, match="^dtype: float16 does not run on cpu"):
        fastdiff.edit(image(), "snow", model="small", dtype="float16")


def test_from_pretrained_refuses_fp16_on_cpu_before_reading_weights(tmp_path):
    from fastdiff.pipeline import Pipeline

    # no folder at all: the dtype is refused first, in one line
    with pytest.raises(PipelineError, match="^dtype: float16 does not run on cpu"):
        Pipeline.from_pretrained(tmp_path / "nothing-here", dtype="fp16")


# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("height", [1_000_000, 100_000_000])
def test_huge_sizes_fail_at_once(generator, no_model_runs, height):
    with pytest.raises(PipelineError, match=r"^height, width: .* pixels\), over the limit of 4,194,304 \(max_pixels\)"):
        generator.generate("a cat", height=height, progress=False)


def test_pixel_limit_counts_every_image_and_is_configurable(generator, no_model_runs):
    assert generator.max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(PipelineError, match="^height, width: 300 x 128x128"):
        generator.generate("a cat", num_images=300, progress=False)
    small = copy.copy(generator)
    small.max_pixels = 64 * 64
    with pytest.raises(PipelineError, match=r"^height, width: 1 x 128x128 \(16,384 pixels\), over the limit of 4,096"):
        small.run(GenerateRequest(prompt="a cat"))


def test_edit_image_over_the_limit_is_refused_before_decoding(editor, no_model_runs, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2100, 2100)).save(path)
    with pytest.raises(PipelineError, match=r"^image: '.*big.png' is 2100x2100 \(4,410,000 pixels\), over the limit"):
        editor.edit(path, "snow", progress=False)
    with pytest.raises(PipelineError, match=r"^image: 2100x2100 \(4,410,000 pixels\)"):
        editor.edit(np.zeros((2100, 2100, 3), np.uint8), "snow", progress=False)


def test_decompression_bomb_is_a_pipeline_error(editor, no_model_runs, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb check, scaled down to a 64x64 file
    with pytest.raises(PipelineError, match="^image: '.*bomb.png' refused by PIL's decompression-bomb check"):
        editor.edit(path, "snow", progress=False)


# -- non-finite values -------------------------------------------------------------------------

def test_nan_embeddings_are_refused_at_the_door(generator, editor, no_model_runs):
    bad = torch.randn(77, 32)
    bad[3, 5] = float("nan")
    with pytest.raises(PipelineError, match="^prompt_embeds: contains NaN"):
        generator.generate(prompt_embeds=bad, progress=False)
    with pytest.raises(PipelineError, match="^instruction_embeds: contains NaN"):
        editor.edit(image(), instruction_embeds=bad, progress=False)
    with pytest.raises(PipelineError, match="^image: the array contains NaN"):
        editor.edit(np.full((32, 32, 3), np.nan), "snow", progress=False)


def test_nan_weights_fail_naming_the_step_instead_of_a_black_image(editor):
    broken = copy.deepcopy(editor)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(PipelineError, match=r"^latents: no longer finite at step 1 of 3"):
        broken.edit(image(), "snow", steps=3, progress=False)


def test_nan_weights_in_the_engine_fail_only_that_request(editor):
    broken = copy.deepcopy(editor)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with fastdiff.Engine(broken) as engine:
        future = engine.submit(EditRequest(image=image(), instruction="snow", steps=2))
        with pytest.raises(PipelineError, match=r"^latents: no longer finite at step 1 of 2 "):
            future.result(timeout=120)


@pytest.mark.parametrize("sampler, top", [("ddim", 999), ("dpmpp_2m", 998), ("euler_ancestral", 1000)])
def test_steps_beyond_the_samplers_range_are_refused_with_it(editor, no_model_runs, sampler, top):
    """Every step count up to the schedule's length works or is refused at the door, naming the range
    (DDIM at 1000 was an IndexError, DPM-Solver++ a ZeroDivisionError, mid-denoise)."""
    for steps in (top + 1, 10**6):
        with pytest.raises(PipelineError, match=rf"^steps: .* 1\.\.{top} for the {sampler} sampler"):
            editor.edit(image(), "snow", steps=steps, sampler=sampler, progress=False)


def test_a_used_pipeline_can_be_deep_copied(editor):
    """Packed weights (oneDNN's opaque tensors, cached per module after the first call) stay out of
    the modules, so copy.deepcopy of a pipeline that has run works and the copy gives the same image."""
    first = editor.edit(image(), "snow", steps=2, seed=1, output_type="np", progress=False)
    twin = copy.deepcopy(editor)
    np.testing.assert_allclose(twin.edit(image(), "snow", steps=2, seed=1, output_type="np", progress=False), first,
                               atol=1e-6)
