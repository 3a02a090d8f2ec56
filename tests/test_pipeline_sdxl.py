"""fastdiff's own Pipeline on an SDXL folder (two text encoders, pooled embedding, size/crop ids)
against diffusers' StableDiffusionXLPipeline: a tiny random SDXL pipeline built as diffusers' tests
build it (tests/test_accelerate_sdxl.py's components), saved by diffusers and read back through
Pipeline.from_pretrained. Same initial latents and scheduler -> the same images (fp32, pixels in
[0, 1]) within IMAGE_PARITY; the Engine and step caching batch SDXL rows with their added
conditioning; what is refused is named.
"""
import json
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.engine import Engine  # noqa: E402
from fastdiff.pipeline import Pipeline  # noqa: E402
from fastdiff.requests import GenerateRequest, PipelineError  # noqa: E402
from test_accelerate_sdxl import (IMAGE_PARITY, POOLED, SDXL_SCHEDULER, WIDE, assert_differs,  # noqa: E402
                                  assert_image_parity, sdxl_text_encoders, sdxl_unet)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

LATENT = 32  # the UNet's sample_size: 64-pixel images through the 2x tiny VAE
SDXL_VAE_SCALE = 0.13025  # SDXL's VAE scaling_factor (SD's is 0.18215): the folder's must be the one used


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers-saved StableDiffusionXLPipeline; its tokenizer and VAE are test_pipeline's tiny ones."""
    from test_pipeline import tiny_parts

    root = tmp_path_factory.mktemp("sdxl_pipeline")
    tokenizer, _, vae = tiny_parts(root)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALE)
    text_encoder, text_encoder_2 = sdxl_text_encoders()
    diffusers.StableDiffusionXLPipeline(
        unet=sdxl_unet(4, 1, **WIDE), vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
    ).save_pretrained(root / "sdxl")
    return root / "sdxl"


@pytest.fixture(scope="module")
def sdxl(folder):
    return Pipeline.from_pretrained(folder)


def reference(folder, scheduler=None):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch=1, seed=7, side=LATENT, width=None):
    return torch.randn(batch, 4, side, width or side, generator=torch.Generator().manual_seed(seed))


def test_sdxl_folder_loads_with_sdxl_defaults(sdxl):
    from fastdiff.models.text_encoder import SDXLTextEncoders

    assert sdxl.is_sdxl and isinstance(sdxl.text_encoder, SDXLTextEncoders)
    assert sdxl.text_encoder.hidden_size == sdxl.cross_attention_dim == 64 and sdxl.pooled_size == POOLED
    assert sdxl.vae.config.scaling_factor == SDXL_VAE_SCALE and sdxl.force_zeros_for_empty_prompt
    assert sdxl.defaults.guidance_scale == 5.0 and sdxl.defaults.size == 2 * LATENT  # StableDiffusionXLPipeline's


def test_generate_matches_diffusers(folder, sdxl):
    """The default call (no negative prompt: zeros, force_zeros_for_empty_prompt), a negative prompt
    with two images and other size/crop ids, guidance off, and a non-square size."""
    ref = reference(folder)
    run = dict(num_inference_steps=3, output_type="np")
    mine = dict(steps=3, output_type="np", progress=False)
    conditioned = dict(negative_prompt="a dog", original_size=(32, 48), crops_coords_top_left=(4, 0), target_size=(64, 48))
    cases = {
        "default": (ref("a red cat", latents=noise(), **run), sdxl.generate("a red cat", latents=noise(), **mine)),
        "negative prompt, size/crop ids, two images": (
            ref("a red cat", num_images_per_prompt=2, latents=noise(2), **conditioned, **run),
            sdxl.generate("a red cat", num_images=2, latents=noise(2), **conditioned, **mine)),
        "unguided": (ref("a dog", guidance_scale=1.0, latents=noise(), **run),
                     sdxl.generate("a dog", guidance_scale=1.0, latents=noise(), **mine)),
        "non-square": (ref("a cat", height=48, width=80, latents=noise(side=24, width=40), **run),
                       sdxl.generate("a cat", height=48, width=80, latents=noise(side=24, width=40), **mine)),
    }
    for label, (theirs, ours) in cases.items():
        assert_image_parity(ours, theirs.images, f"SDXL generate, {label}")
    default, two = cases["default"][1], cases["negative prompt, size/crop ids, two images"][1]
    assert_differs(two[:1], default, "SDXL negative prompt and size/crop ids")
    # each part of the added conditioning reaches the image
    only_ids = sdxl.generate("a red cat", latents=noise(), original_size=(32, 48), **mine)
    assert_differs(only_ids, default, "SDXL original_size")
    assert sdxl.generate("a cat", steps=1, progress=False, output_type="np", seed=0).shape == (1, 64, 64, 3)


def test_embeddings_and_another_sampler_match_diffusers(folder, sdxl):
    """prompt_embeds with pooled_prompt_embeds (and negatives) from diffusers' encode_prompt, on
    DPM-Solver++ 2M: fastdiff's sampler by name, diffusers' from the folder's config."""
    ref = reference(folder, "DPMSolverMultistepScheduler")
    embeds, negative, pooled, negative_pooled = ref.encode_prompt("a red cat", negative_prompt="a dog")
    embeds, pooled = embeds * 1.5, pooled * 1.5  # no prompt's features
    given = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=negative_pooled, latents=noise(), output_type="np")
    theirs = ref(num_inference_steps=3, **given).images
    ours = sdxl.generate(steps=3, sampler="dpmpp_2m", progress=False, **given)
    assert_image_parity(ours, theirs, "SDXL embeddings, dpmpp_2m")


def test_empty_prompt_encoded_without_force_zeros(folder, sdxl, tmp_path):
    """force_zeros_for_empty_prompt false in model_index.json: the unconditional branch encodes "" (as diffusers)."""
    copy = tmp_path / "no_zeros"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # diffusers writes it
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    ref, ours = reference(copy), Pipeline.from_pretrained(copy)
    theirs = ref("a red cat", num_inference_steps=3, latents=noise(), output_type="np").images
    mine = ours.generate("a red cat", steps=3, latents=noise(), output_type="np", progress=False)
    assert_image_parity(mine, theirs, "SDXL without force_zeros_for_empty_prompt")
    zeros = sdxl.generate("a red cat", steps=3, latents=noise(), output_type="np", progress=False)
    assert_differs(mine, zeros, "SDXL encoded empty prompt vs zeros")


def rows_per_call(pipe):
    """Records each UNet call's rows and whether it got SDXL's added conditioning."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["text_embeds"].shape[0], kwargs["time_ids"].shape[0]))

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


REQUESTS = [  # other prompts, ids, guidance, sampler; one with step caching
    dict(prompt="a red cat", steps=4, seed=0, cache_interval=2),
    dict(prompt="a dog", steps=3, seed=1, negative_prompt="a cat", original_size=(32, 48), crops_coords_top_left=(2, 4),
         sampler="euler_ancestral", guidance_scale=3.0),
    dict(prompt="a cat", steps=3, seed=2, guidance_scale=1.0),
]


def test_engine_batches_sdxl_requests_as_alone(sdxl):
    alone = [sdxl.generate(output_type="np", progress=False, **request)[0] for request in REQUESTS]
    calls, handle = rows_per_call(sdxl)
    try:
        with Engine(sdxl, max_batch=len(REQUESTS), max_wait_ms=60_000) as engine:
            futures = [engine.submit(GenerateRequest(output_type="np", **request)) for request in REQUESTS]
            results = [f.result(timeout=120) for f in futures]
    finally:
        handle.remove()
    assert calls[0] == (5, 5, 5)  # one call: 2 + 2 + 1 rows, each with its pooled embedding and ids
    assert sum(rows for rows, _, _ in calls) == 2 * 4 + 2 * 3 + 1 * 3
    diffs = [float(np.abs(result - image).max()) for result, image in zip(results, alone)]
    print(f"SDXL batched vs alone: max |diff| per request {['%.1e' % d for d in diffs]}")
    assert max(diffs) <= IMAGE_PARITY


def test_step_caching_runs_on_sdxl(sdxl):
    """cache_interval 1 is the uncached image bit for bit; 2 skips the deep blocks on odd steps and stays close."""
    mine = dict(prompt="a red cat", steps=4, latents=noise(), output_type="np", progress=False)
    plain = sdxl.generate(**mine)
    assert np.array_equal(sdxl.generate(cache_interval=1, **mine), plain)
    mid_rows = []
    handle = sdxl.unet.mid_block.resnets[0].register_forward_pre_hook(lambda module, args: mid_rows.append(args[0].shape[0]))
    try:
        cached = sdxl.generate(cache_interval=2, **mine)
    finally:
        handle.remove()
    assert mid_rows == [2, 2]  # steps 0 and 2 only, both guidance rows
    diff = float(np.abs(cached - plain).max())
    print(f"SDXL cache_interval=2 vs uncached: max |diff| {diff:.2e}")
    assert 0 < diff < 0.25


def test_save_pipeline_round_trip(sdxl, tmp_path):
    from fastdiff.loading import save_pipeline

    save_pipeline(sdxl, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    reloaded = Pipeline.from_pretrained(tmp_path / "saved")
    mine = dict(prompt="a red cat", steps=2, latents=noise(), output_type="np", progress=False)
    assert np.array_equal(reloaded.generate(**mine), sdxl.generate(**mine))


def test_vae_follows_force_upcast_in_float16(folder):
    """diffusers' SDXL pipelines run a force_upcast VAE in float32 when the pipeline is float16
    (SDXL's VAE overflows there); fastdiff loads it so (float16 runs on CUDA only: loaded here, not run)."""
    from fastdiff.loading import load_vae

    assert load_vae(folder / "vae", dtype=torch.float16, upcast_fp16=True).dtype == torch.float32
    assert load_vae(folder / "vae", dtype=torch.float16).dtype == torch.float16
    assert load_vae(folder / "vae", dtype=torch.bfloat16, upcast_fp16=True).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt_embeds=torch.zeros(77, 64)), "pooled_prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(77, 64), pooled_prompt_embeds=torch.zeros(16)), "pooled_prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(77, 64), pooled_prompt_embeds=torch.zeros(POOLED),
          negative_prompt_embeds=torch.zeros(77, 64)), "negative_pooled_prompt_embeds"),
    (dict(prompt="a cat", pooled_prompt_embeds=torch.zeros(POOLED)), "pooled_prompt_embeds"),
    (dict(prompt="a cat", original_size=(64,)), "original_size"),
    (dict(prompt="a cat", crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
    (dict(prompt="a cat", target_size=(64.0, 64)), "target_size"),
])
def test_sdxl_argument_errors_name_the_argument(sdxl, kwargs, name):
    with pytest.raises(PipelineError) as error:
        sdxl.generate(steps=1, progress=False, **kwargs)
    assert error.value.field == name, str(error.value)


def test_sdxl_arguments_refused_by_other_models():
    from fastdiff.default_model import default_pipeline

    with pytest.raises(PipelineError, match="^original_size: this model has no SDXL added conditioning"):
        default_pipeline("generate", "small").generate("a cat", original_size=(64, 64), progress=False)


def test_sdxl_folder_and_part_errors_are_named(folder, sdxl, tmp_path):
    from fastdiff.models.unet_2d_condition import UNet2DCondition

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(PipelineError, match="^folder: the text_encoder_2/ part is missing .*refiner"):
        Pipeline.from_pretrained(broken)
    vae = sdxl.vae
    with pytest.raises(PipelineError, match="^text_encoder: an SDXL UNet needs both SDXL text encoders"):
        Pipeline(unet=sdxl.unet, vae=vae, scheduler_config=SDXL_SCHEDULER, text_encoder=sdxl.text_encoder.first)
    with pytest.raises(PipelineError, match="^unet: an SDXL editing UNet \\(8 input channels"):
        Pipeline(unet=UNet2DCondition.from_diffusers(sdxl_unet(8, 1, **WIDE)), vae=vae, scheduler_config=SDXL_SCHEDULER)
    refiner_like = UNet2DCondition.from_diffusers(sdxl_unet(4, 1, **WIDE, projection_class_embeddings_input_dim=POOLED + 5 * 8))
    with pytest.raises(PipelineError, match="^text_encoder: pooled width 32 \\+ 6 size/crop ids x 8 differs .* 72"):
        Pipeline(unet=refiner_like, vae=vae, scheduler_config=SDXL_SCHEDULER, text_encoder=sdxl.text_encoder)
