"""fastdiff.Pipeline end to end against diffusers' StableDiffusionPipeline and
StableDiffusionInstructPix2PixPipeline on the same tiny models (random weights, perturbed so every
parameter matters), saved by diffusers and loaded back through Pipeline.from_pretrained.

Same initial latents + a deterministic sampler -> the same images (fp32, pixels in [0, 1],
output_type "np") within PARITY; MGIE mode is checked against diffusers' IP2P fed the edit head's
outputs. The largest difference of each case is printed (pytest -s shows them).
"""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fastdiff import ops  # noqa: E402
from fastdiff.models.edit_head import EditHead  # noqa: E402
from fastdiff.pipeline import Pipeline, PipelineError  # noqa: E402
from helpers import backend_param  # noqa: E402

# diffusers 0.42's schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PARITY = 1e-3  # max |pixel difference| in [0, 1], fp32, whole pipeline
BACKENDS = [backend_param("cpp"), backend_param("reference")]
SAMPLERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
STEPS = 4
# stable-diffusion-v1-5's scheduler/scheduler_config.json
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                "steps_offset": 1, "trained_betas": None}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
LATENT = 16  # latent side: 32-pixel images through the 2x tiny VAE


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(module, seed):
    """Random init leaves norms at (1, 0) and some biases at 0: perturb every parameter so it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_unet(in_channels, seed):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=LATENT, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4)
    return perturbed(unet, seed)


def tiny_parts(root):
    """The tokenizer, text encoder and VAE shared by both pipelines."""
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    tokens += [m.replace(" ", "") for m in MERGES]
    folder = root / "tokenizer_src"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1)
    text_encoder = transformers.CLIPTextModel(config).eval()
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=32, sample_size=2 * LATENT)
    return tokenizer, text_encoder, perturbed(vae, 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """diffusers-saved pipeline folders: "t2i" (SD-style, Euler from SD's config) and "ip2p" (8-channel UNet)."""
    root = tmp_path_factory.mktemp("tiny_pipelines")
    tokenizer, text_encoder, vae = tiny_parts(root)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    diffusers.StableDiffusionPipeline(unet=tiny_unet(4, 2), **common).save_pretrained(root / "t2i")
    diffusers.StableDiffusionInstructPix2PixPipeline(unet=tiny_unet(8, 3), **common).save_pretrained(root / "ip2p")
    return root


def reference_pipeline(cls, folder, sampler):
    """diffusers' pipeline read from `folder`, with `sampler`'s scheduler made from the folder's config
    (as `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`)."""
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2i(folders):
    return Pipeline.from_pretrained(folders / "t2i")


@pytest.fixture(scope="module")
def ip2p(folders):
    return Pipeline.from_pretrained(folders / "ip2p")


def noise(batch=1, seed=7, side=LATENT, width=None):
    return torch.randn(batch, 4, side, width or side, generator=torch.Generator().manual_seed(seed))


def make_image(width=32, height=32, seed=5):
    """A smooth RGB test image (gradients + a little noise), not constant anywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(3 * x + 1), np.cos(4 * y), x * y]
    array = np.stack(channels, -1) * 0.4 + 0.5 + 0.05 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))


def assert_parity(ours, theirs, label):
    assert ours.shape == theirs.shape, f"{label}: shape {ours.shape} vs diffusers {theirs.shape}"
    diff = float(np.abs(ours - theirs).max())
    print(f"parity {label}: max |diff| = {diff:.2e}")
    assert diff <= PARITY, f"{label}: max |pixel diff| {diff:.2e} > {PARITY}"
    return diff


# -- text to image -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_generate_matches_diffusers(folders, t2i, sampler, backend):
    ref = reference_pipeline(diffusers.StableDiffusionPipeline, folders / "t2i", sampler)
    latents = noise()
    theirs = ref("a red cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents, output_type="np").images
    # the folder's scheduler (Euler) is the default sampler; the others are chosen by name
    with ops.use_backend(backend):
        ours = t2i.generate("a red cat", steps=STEPS, guidance_scale=5.0, latents=latents, output_type="np",
                            sampler=None if sampler == "euler" else sampler, progress=False)
    assert_parity(ours, theirs, f"generate {sampler} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_variants_match_diffusers(folders, t2i, backend):
    """Negative prompt, two images per call, given embeddings, and guidance off (scale <= 1)."""
    ref = reference_pipeline(diffusers.StableDiffusionPipeline, folders / "t2i", "dpmpp_2m")
    run = dict(num_inference_steps=3, output_type="np")
    mine = dict(steps=3, output_type="np", sampler="dpmpp_2m", progress=False)
    embeds = t2i.text_encoder.encode(["a red dog"]).float() * 1.5  # not any prompt's features
    with ops.use_backend(backend):
        cases = {
            "negative prompt": (ref("a cat", negative_prompt="red dog", guidance_scale=7.5, latents=noise(), **run),
                                t2i.generate("a cat", negative_prompt="red dog", guidance_scale=7.5, latents=noise(), **mine)),
            "two images": (ref("a cat", num_images_per_prompt=2, guidance_scale=4.0, latents=noise(2), **run),
                           t2i.generate("a cat", num_images=2, guidance_scale=4.0, latents=noise(2), **mine)),
            "prompt_embeds": (ref(prompt_embeds=embeds, guidance_scale=3.0, latents=noise(), **run),
                              t2i.generate(prompt_embeds=embeds[0], guidance_scale=3.0, latents=noise(), **mine)),
            "unguided": (ref("a dog", guidance_scale=1.0, latents=noise(), **run),
                         t2i.generate("a dog", guidance_scale=1.0, latents=noise(), **mine)),
            "non-square": (ref("a dog", guidance_scale=2.0, height=24, width=40, latents=noise(side=12, width=20), **run),
                           t2i.generate("a dog", guidance_scale=2.0, height=24, width=40, latents=noise(side=12, width=20), **mine)),
        }
    for label, (theirs, ours) in cases.items():
        assert_parity(ours, theirs.images, f"generate {label} {backend}")


def test_sd15_pndm_folder_falls_back_to_dpmpp_2m(folders, tmp_path):
    """SD1.5 ships PNDMScheduler, which fastdiff does not implement: it samples with DPM-Solver++ 2M
    on the same config (with a warning), i.e. diffusers' DPMSolverMultistepScheduler.from_config."""
    folder = tmp_path / "sd15_like"
    shutil.copytree(folders / "t2i", folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    with pytest.warns(UserWarning, match="PNDMScheduler"):
        pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.sampler == "dpmpp_2m"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a cat", num_inference_steps=3, guidance_scale=5.0, latents=noise(), output_type="np").images
    ours = pipe.generate("a cat", steps=3, guidance_scale=5.0, latents=noise(), output_type="np", progress=False)
    assert_parity(ours, theirs, "generate PNDM folder -> dpmpp_2m")


# -- editing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_edit_matches_diffusers(folders, ip2p, sampler, backend):
    ref = reference_pipeline(diffusers.StableDiffusionInstructPix2PixPipeline, folders / "ip2p", sampler)
    image, latents = make_image(), noise()
    theirs = ref("make it red", image=image, num_inference_steps=STEPS, guidance_scale=6.0, image_guidance_scale=1.4,
                 latents=latents, output_type="np").images
    with ops.use_backend(backend):
        ours = ip2p.edit(image, "make it red", steps=STEPS, guidance_scale=6.0, image_guidance_scale=1.4, latents=latents,
                         output_type="np", sampler=None if sampler == "euler" else sampler, progress=False)
    assert_parity(ours[None], theirs, f"edit {sampler} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_variants_match_diffusers(folders, ip2p, backend):
    """Guidance off (either scale), given instruction embeddings, and an image whose sides are not
    multiples of the VAE factor (both resize with Lanczos, then the UNet sees odd latent sides)."""
    ref = reference_pipeline(diffusers.StableDiffusionInstructPix2PixPipeline, folders / "ip2p", "ddim")
    run = dict(num_inference_steps=3, output_type="np")
    mine = dict(steps=3, output_type="np", sampler="ddim", progress=False)
    image = make_image()
    embeds = ip2p.text_encoder.encode(["red dog"]).float() * 1.5
    odd = make_image(width=37, height=27, seed=9)  # -> 36 x 26 pixels, 18 x 13 latents
    with ops.use_backend(backend):
        cases = {
            "text scale 1 (unguided)": (ref("make it red", image=image, guidance_scale=1.0, latents=noise(), **run),
                                        ip2p.edit(image, "make it red", guidance_scale=1.0, latents=noise(), **mine)),
            "image scale < 1 (unguided)": (ref("make it red", image=image, image_guidance_scale=0.5, latents=noise(), **run),
                                           ip2p.edit(image, "make it red", image_guidance_scale=0.5, latents=noise(), **mine)),
            "instruction_embeds": (ref(prompt_embeds=embeds, image=image, guidance_scale=5.0, latents=noise(), **run),
                                   ip2p.edit(image, instruction_embeds=embeds[0], guidance_scale=5.0, latents=noise(), **mine)),
            "odd size": (ref("a cat", image=odd, latents=noise(side=13, width=18), **run),
                         ip2p.edit(odd, "a cat", latents=noise(side=13, width=18), **mine)),
        }
    for label, (theirs, ours) in cases.items():
        assert_parity(ours[None], theirs.images, f"edit {label} {backend}")


def mgie_folder(root, seed=11, llm_dim=64, vocab=40):
    """A fake MGIE checkpoint folder: unet.pt (another tiny IP2P UNet's state_dict, wrapped as in
    some MGIE dumps) and mllm.pt (LLM embed_tokens, a small edit head under 'edit_head.', emb)."""
    folder = root / "mgie"
    folder.mkdir()
    unet = tiny_unet(8, seed)
    torch.save({k: v.clone() for k, v in unet.state_dict().items()}, folder / "unet.pt")
    torch.manual_seed(seed)
    head = perturbed(EditHead(llm_dim=llm_dim, hidden_dim=32, out_dim=32, num_queries=77, num_heads=4, num_encoder_layers=1,
                               num_decoder_layers=2, dim_feedforward=48), seed)
    mllm = {"model.embed_tokens.weight": torch.randn(vocab, llm_dim), "lm_head.weight": torch.randn(vocab, llm_dim),
            "emb": torch.randn(1, 8, llm_dim)}
    mllm.update({f"edit_head.{k}": v.clone() for k, v in head.state_dict().items()})
    torch.save(mllm, folder / "mllm.pt")
    return folder, unet


@pytest.mark.parametrize("backend", BACKENDS)
def test_mgie_edit_matches_diffusers_with_edit_head_embeddings(folders, tmp_path, backend):
    """edit(img_hidden_states=h) == diffusers IP2P with prompt_embeds = head(h, emb) and
    negative_prompt_embeds = head(0, emb), emb = mllm.pt's emb, and MGIE's UNet weights."""
    mgie, mgie_unet = mgie_folder(tmp_path)
    pipe = Pipeline.from_pretrained(folders / "ip2p", mgie=mgie)
    mllm = torch.load(mgie / "mllm.pt", weights_only=True)
    head = EditHead.from_mgie(mllm)  # built on its own from the same file
    emb = mllm["emb"]
    hidden = torch.randn(8, emb.shape[-1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prompt_embeds, null_embeds = head(hidden[None], emb), head(torch.zeros(1, *hidden.shape), emb)
    ref = reference_pipeline(diffusers.StableDiffusionInstructPix2PixPipeline, folders / "ip2p", "euler")
    ref.unet.load_state_dict(mgie_unet.state_dict())
    image = make_image()
    theirs = ref(image=image, prompt_embeds=prompt_embeds, negative_prompt_embeds=null_embeds, num_inference_steps=STEPS,
                 guidance_scale=7.5, image_guidance_scale=1.5, latents=noise(), output_type="np").images
    with ops.use_backend(backend):
        ours = pipe.edit(image, img_hidden_states=hidden, steps=STEPS, guidance_scale=7.5, image_guidance_scale=1.5,
                         latents=noise(), output_type="np", progress=False)
    assert_parity(ours[None], theirs, f"mgie edit {backend}")
    # MGIE's UNet weights were loaded: the folder's own UNet gives another image
    plain = Pipeline.from_pretrained(folders / "ip2p")
    other = plain.edit(image, instruction_embeds=prompt_embeds[0], negative_instruction_embeds=null_embeds[0], steps=STEPS,
                       latents=noise(), output_type="np", progress=False)
    assert np.abs(other - ours).max() > 10 * PARITY


# -- diffusers' names: generator, prompt lists, callbacks, output types ---------------------------

def _scale_latents_at_step_1(pipe, step, timestep, callback_kwargs):
    """A callback_on_step_end that changes the latents (so ignoring its return value would show)."""
    calls.append((step, float(timestep)))
    return {"latents": callback_kwargs["latents"] * 0.9} if step == 1 else {}


calls: list = []


def test_diffusers_call_style_matches_diffusers(folders, t2i):
    """One torch.Generator for four images (two prompts x num_images_per_prompt=2), an ancestral
    sampler drawing fresh noise every step, per-prompt negative prompts, num_inference_steps and
    a callback_on_step_end that edits the latents: the same images as diffusers' pipeline."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders / "t2i", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    args = dict(negative_prompt=["red", "dog"], num_inference_steps=3, num_images_per_prompt=2, guidance_scale=5.0,
                callback_on_step_end=_scale_latents_at_step_1, output_type="np")
    calls.clear()
    theirs = ref(["a cat", "a red dog"], generator=torch.Generator().manual_seed(11), **args).images
    their_calls = list(calls)
    calls.clear()
    ours = t2i.generate(["a cat", "a red dog"], generator=torch.Generator().manual_seed(11), sampler="euler_ancestral",
                        progress=False, **args)
    assert calls == their_calls and len(calls) == 3
    assert_parity(ours, theirs, "generate, diffusers call style")


def test_generator_lists_and_output_types(t2i):
    one = t2i.generate("a cat", steps=2, generator=[torch.Generator().manual_seed(3)], output_type="np", progress=False)
    seeded = t2i.generate("a cat", steps=2, seed=3, output_type="np", progress=False)
    np.testing.assert_array_equal(one, seeded)  # seed s is generator(s): the same noise
    pt = t2i.generate("a cat", steps=2, seed=3, output_type="pt", progress=False)
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), seeded, atol=1e-6)
    latents = t2i.generate("a cat", steps=2, seed=3, output_type="latent", progress=False)
    assert latents.shape == (1, 4, LATENT, LATENT)
    decoded = t2i.decode([latents], "np")
    np.testing.assert_allclose(decoded, seeded, atol=1e-6)
    with pytest.raises(PipelineError, match=r"^generator: expected one generator per image \(2\), got 1"):
        t2i.generate("a cat", num_images=2, generator=[torch.Generator()], progress=False)
    with pytest.raises(PipelineError, match="^seed: give at most one of seed, generator"):
        t2i.generate("a cat", seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(PipelineError, match="^num_inference_steps: give at most one"):
        t2i.generate("a cat", steps=2, num_inference_steps=3, progress=False)
    with pytest.raises(PipelineError, match=r"^negative_prompt: expected one per prompt \(2\), got 1"):
        t2i.generate(["a cat", "a dog"], negative_prompt=["x"], progress=False)
    with pytest.raises(PipelineError, match="^callback_on_step_end: expected a callable"):
        t2i.generate("a cat", callback_on_step_end="print", progress=False)
    with pytest.raises(PipelineError, match="^callback_on_step_end: returned latents of"):
        t2i.generate("a cat", steps=2, callback_on_step_end=lambda *a: {"latents": torch.zeros(3)}, progress=False)


def test_edit_takes_negative_prompt_and_num_images(folders, ip2p):
    """InstructPix2Pix with a negative prompt and two images per call, against diffusers."""
    ref = reference_pipeline(diffusers.StableDiffusionInstructPix2PixPipeline, folders / "ip2p", "euler")
    theirs = ref("make it red", image=make_image(), negative_prompt="blue", num_images_per_prompt=2,
                 num_inference_steps=3, latents=noise(2), output_type="np").images
    ours = ip2p.edit(make_image(), prompt="make it red", negative_prompt="blue", num_images=2, steps=3,
                     latents=noise(2), output_type="np", progress=False)
    assert_parity(ours, theirs, "edit, negative prompt, 2 images")


# -- inputs, outputs, errors -------------------------------------------------------------------------

def test_image_inputs_are_equivalent(ip2p, tmp_path):
    """PIL (any mode), uint8 and float arrays and paths give the same edit as the RGB PIL image."""
    image = make_image()
    image.save(tmp_path / "in.png")
    run = dict(steps=2, seed=4, output_type="np", progress=False)
    want = ip2p.edit(image, "make it red", **run)
    array = np.asarray(image)
    for label, given in {"path": tmp_path / "in.png", "str path": str(tmp_path / "in.png"), "uint8 array": array,
                         "float array": array / 255.0, "RGBA": image.convert("RGBA")}.items():
        got = ip2p.edit(given, "make it red", **run)
        assert np.abs(got - want).max() <= 1e-6, label
    gray = image.convert("L")
    got = ip2p.edit(gray, "make it red", **run)  # converted to RGB (3 equal channels)
    np.testing.assert_array_equal(got, ip2p.edit(gray.convert("RGB"), "make it red", **run))
    pil = ip2p.edit(image, "make it red", steps=2, seed=4, progress=False)
    assert isinstance(pil, Image.Image) and pil.size == (32, 32) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil), (want * 255).round().astype(np.uint8))


def test_seeds_make_results_reproducible_and_distinct(t2i):
    run = dict(steps=2, guidance_scale=3.0, output_type="np", progress=False)
    a, b = t2i.generate("a cat", seed=1, **run), t2i.generate("a cat", seed=1, **run)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - t2i.generate("a cat", seed=2, **run)).max() > 0.01
    two = t2i.generate("a cat", seed=1, num_images=2, **run)  # image i uses seed + i
    # equal up to rounding: a 4-row UNet call may block its GEMMs / convs differently than a 2-row one
    np.testing.assert_allclose(two[0], a[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two[1], t2i.generate("a cat", seed=2, **run)[0], rtol=0, atol=1e-5)


def test_progress_bar_switch(t2i, capsys):
    t2i.generate("a cat", steps=2, seed=0, progress=False)
    assert "denoising" not in capsys.readouterr().err
    t2i.generate("a cat", steps=2, seed=0, progress=True)
    assert "denoising" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=1001), "steps"),
    (dict(guidance_scale="x"), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1), "guidance_scale"),
    (dict(height=31), "height"),
    (dict(width=0), "width"),
    (dict(seed="a"), "seed"),
    (dict(seed=-3), "seed"),
    (dict(sampler="plms"), "sampler"),
    (dict(num_images=0), "num_images"),
    (dict(output_type="tensor"), "output_type"),
    (dict(prompt_embeds=torch.randn(77, 31)), "prompt_embeds"),
    (dict(prompt_embeds=torch.randn(2, 77, 32)), "prompt_embeds"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(prompt=None), "prompt"),
    (dict(prompt_embeds=torch.randn(77, 32), prompt="a cat"), "prompt"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.randn(77, 32)), "negative_prompt"),
    (dict(negative_prompt_embeds=torch.randn(76, 32)), "negative_prompt_embeds"),
    (dict(latents=torch.randn(1, 3, 16, 16)), "latents"),
    (dict(latents=torch.randn(2, 4, 16, 16)), "latents"),
])
def test_generate_argument_errors_name_the_argument(t2i, kwargs, name):
    kwargs = {"prompt": "a cat" if "prompt_embeds" not in kwargs else None, "steps": 2, **kwargs}
    with pytest.raises(PipelineError, match=f"^{name}:"):
        t2i.generate(progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(image="/nonexistent/picture.png"), "image"),
    (dict(image=np.zeros((4, 4, 2))), "image"),
    (dict(image=np.zeros((32, 32, 3), dtype=np.int32)), "image"),
    (dict(image=Image.new("RGB", (1, 1))), "image"),
    (dict(image=12), "image"),
    (dict(steps=0), "steps"),
    (dict(guidance_scale="x"), "guidance_scale"),
    (dict(guidance_scale=True), "guidance_scale"),
    (dict(image_guidance_scale=-0.5), "image_guidance_scale"),
    (dict(instruction=None), "instruction"),
    (dict(instruction_embeds=torch.randn(77, 32)), "instruction"),  # both given
    (dict(instruction=None, instruction_embeds=torch.randn(77, 16)), "instruction_embeds"),
    (dict(instruction=None, instruction_embeds=torch.randn(77, 32), negative_instruction_embeds=torch.randn(76, 32)),
     "negative_instruction_embeds"),
    (dict(instruction=None, img_hidden_states=torch.randn(8, 64)), "img_hidden_states"),  # no edit head loaded
    (dict(latents=torch.randn(1, 4, 8, 8)), "latents"),
    (dict(sampler=3), "sampler"),
    (dict(sampler="x0", steps=2), "steps"),
])
def test_edit_argument_errors_name_the_argument(ip2p, tmp_path, kwargs, name):
    kwargs = {"image": make_image(), "instruction": "make it red", "steps": 2, **kwargs}
    with pytest.raises(PipelineError, match=f"^{name}:"):
        ip2p.edit(progress=False, **kwargs)


def test_unreadable_image_file(ip2p, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match="^image: cannot read .*broken.png"):
        ip2p.edit(tmp_path / "broken.png", "make it red", steps=1, progress=False)


def test_wrong_pipeline_kind(t2i, ip2p):
    with pytest.raises(PipelineError, match="^generate: .*use edit"):
        ip2p.generate("a cat", steps=1, progress=False)
    with pytest.raises(PipelineError, match="^edit: .*use generate"):
        t2i.edit(make_image(), "a cat", steps=1, progress=False)


def test_no_text_encoder_needs_embeddings(folders, tmp_path):
    folder = tmp_path / "no_text"
    shutil.copytree(folders / "ip2p", folder)
    shutil.rmtree(folder / "text_encoder")
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.text_encoder is None
    with pytest.raises(PipelineError, match="^instruction: this pipeline has no text encoder"):
        pipe.edit(make_image(), "make it red", steps=1, progress=False)
    with pytest.raises(PipelineError, match="^negative_instruction: .*pass negative_instruction_embeds"):
        pipe.edit(make_image(), instruction_embeds=torch.randn(77, 32), steps=1, progress=False)
    image = pipe.edit(make_image(), instruction_embeds=torch.randn(77, 32), negative_instruction_embeds=torch.randn(77, 32),
                      steps=1, progress=False)
    assert image.size == (32, 32)
    unguided = pipe.edit(make_image(), instruction_embeds=torch.randn(77, 32), guidance_scale=1.0, steps=1, progress=False)
    assert unguided.size == (32, 32)


@pytest.mark.parametrize("part", ["vae", "unet", "scheduler", "tokenizer"])
def test_missing_folder_part_is_named(folders, tmp_path, part):
    folder = tmp_path / "broken"
    shutil.copytree(folders / "t2i", folder)
    shutil.rmtree(folder / part)
    with pytest.raises(PipelineError, match=f"{part}/ part is missing"):
        Pipeline.from_pretrained(folder)


def test_damaged_weights_and_configs_are_named(folders, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(folders / "t2i", folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="^vae: cannot load"):
        Pipeline.from_pretrained(folder)
    shutil.rmtree(folder)
    shutil.copytree(folders / "t2i", folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(PipelineError, match="^unet: cannot load.*class_embed_type"):
        Pipeline.from_pretrained(folder)
    with pytest.raises(PipelineError, match="^folder: no directory"):
        Pipeline.from_pretrained(tmp_path / "absent")
    (folder / "model_index.json").unlink()
    with pytest.raises(PipelineError, match="model_index.json"):
        Pipeline.from_pretrained(folder)


def test_mgie_folder_errors(folders, tmp_path):
    mgie, _ = mgie_folder(tmp_path)
    (mgie / "mllm.pt").rename(tmp_path / "mllm.pt")
    with pytest.raises(PipelineError, match="^mgie: mllm.pt missing"):
        Pipeline.from_pretrained(folders / "ip2p", mgie=mgie)
    state = torch.load(tmp_path / "mllm.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "emb"}, mgie / "mllm.pt")
    with pytest.raises(PipelineError, match=r"^mgie: .*mllm\.pt has no 'emb'"):
        Pipeline.from_pretrained(folders / "ip2p", mgie=mgie)
    torch.save({"conv_in.weight": torch.zeros(3)}, mgie / "unet.pt")
    with pytest.raises(PipelineError, match="^mgie: unet.pt: cannot load"):
        Pipeline.from_pretrained(folders / "ip2p", mgie=mgie)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a good folder warns about nothing
        Pipeline.from_pretrained(folders / "ip2p")
