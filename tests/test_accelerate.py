"""fastdiff.accelerate on diffusers' own pipelines: tiny random models (perturbed so every parameter
matters), saved by diffusers and loaded back; each case runs the plain pipeline and the
accelerated one with the same arguments and a fresh generator of the same seed.

fp32: max |pixel difference| (pixels in [0, 1]) <= PARITY. bf16: relative error against the fp32
pipeline at most the tolerance table's bf16 bound (fastdiff/validate.py: LOW_PRECISION_FACTOR x
diffusers' own bf16-autocast error, at least LOW_PRECISION_FLOOR). Unsupported features raise
UnsupportedError naming them.
"""
import inspect
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import fastdiff  # noqa: E402
from fastdiff.accelerate import DiffusersUNet, DiffusersVAE, UnsupportedError  # noqa: E402
from fastdiff.models.unet_2d_condition import UNet2DCondition  # noqa: E402
from fastdiff.requests import PipelineError  # noqa: E402
from fastdiff.validate import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, rel_error  # noqa: E402
from test_pipeline import LATENT, SD_SCHEDULER, make_image, perturbed, tiny_parts, tiny_unet  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers 0.42's schedulers call np.array(tensor, copy=False) (numpy 2 deprecation): not ours
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PARITY = 1e-3  # max |pixel difference| in [0, 1], fp32, whole pipeline (issue 8)
STEPS = 3
PROMPT = "a red cat"
COMMON = dict(num_inference_steps=STEPS, output_type="np")


def tiny_controlnet(unet, seed=4):
    # one stride-2 stage in the conditioning embedding: the tiny VAE downsamples by 2, not 8
    torch.manual_seed(seed)
    return perturbed(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """diffusers-saved pipelines: t2i (SD1.5's PNDM config), ip2p (8 channels), inpaint (9),
    controlnet, and a LoRA file for the t2i UNet."""
    root = tmp_path_factory.mktemp("accelerate_pipelines")
    tokenizer, text_encoder, vae = tiny_parts(root)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  scheduler=diffusers.PNDMScheduler.from_config(SD_SCHEDULER), safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    unet = tiny_unet(4, 2)
    diffusers.StableDiffusionPipeline(unet=unet, **common).save_pretrained(root / "t2i")
    diffusers.StableDiffusionInstructPix2PixPipeline(unet=tiny_unet(8, 3), **common).save_pretrained(root / "ip2p")
    diffusers.StableDiffusionInpaintPipeline(unet=tiny_unet(9, 5), **common).save_pretrained(root / "inpaint")
    diffusers.StableDiffusionControlNetPipeline(unet=unet, controlnet=tiny_controlnet(unet), **common) \
        .save_pretrained(root / "controlnet")

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    torch.manual_seed(6)  # init_lora_weights=False: random A and B, so the LoRA changes the image
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return root


def load(cls, folder, scheduler=None):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_and_accelerated(cls, folder, scheduler=None, dtype=None, prepare=None):
    """Two copies of the pipeline read from `folder`, the second accelerated; `prepare(pipe)` runs
    on both before accelerating (e.g. loading LoRA)."""
    plain, fast = load(cls, folder, scheduler), load(cls, folder, scheduler)
    for pipe in (plain, fast):
        if prepare is not None:
            prepare(pipe)
    return plain, fastdiff.accelerate(fast, dtype=dtype)


def run(pipe, seed=0, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), **{**COMMON, **kwargs}).images


def assert_parity(ours, theirs, label):
    assert ours.shape == theirs.shape, f"{label}: shape {ours.shape} vs {theirs.shape}"
    diff = float(np.abs(ours - theirs).max())
    print(f"parity {label}: max |diff| = {diff:.2e}")
    assert diff <= PARITY, f"{label}: max |pixel diff| {diff:.2e} > {PARITY}"


def assert_differs(a, b, label):
    """The case must be able to fail: the feature under test changes the image."""
    assert float(np.abs(a - b).max()) > 100 * PARITY, f"{label}: no visible effect, the parity check proves nothing"


# -- the pipelines, fp32 ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", [None, "EulerAncestralDiscreteScheduler"], ids=["pndm", "euler_ancestral"])
def test_text_to_image(folders, scheduler):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i", scheduler)
    assert isinstance(fast.unet, DiffusersUNet) and isinstance(fast.vae, DiffusersVAE)
    assert isinstance(plain.scheduler, getattr(diffusers, scheduler or "PNDMScheduler"))
    assert_parity(run(fast, prompt=PROMPT), run(plain, prompt=PROMPT), f"text to image, {scheduler or 'PNDM'}")
    if scheduler:  # ancestral: fresh noise from the generator every step, so another seed differs
        assert_differs(run(plain, prompt=PROMPT), run(plain, prompt=PROMPT, seed=1), "generator seed")


def test_image_to_image(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionImg2ImgPipeline, folders / "t2i")
    args = dict(prompt=PROMPT, image=make_image(), strength=0.75, num_inference_steps=4)
    assert_parity(run(fast, **args), run(plain, **args), "image to image")  # latent_dist.sample(generator)


def test_instruct_pix2pix(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionInstructPix2PixPipeline, folders / "ip2p",
                                        "EulerAncestralDiscreteScheduler")
    args = dict(prompt="make it snowy", image=make_image(), image_guidance_scale=1.5)
    assert_parity(run(fast, **args), run(plain, **args), "instruct pix2pix")  # latent_dist.mode()


def test_inpaint_nine_channels(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionInpaintPipeline, folders / "inpaint")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    args = dict(prompt=PROMPT, image=make_image(), mask_image=Image.fromarray(mask), height=32, width=32)
    assert fast.unet.config.in_channels == fast.unet.in_channels == 9
    assert_parity(run(fast, **args), run(plain, **args), "inpaint")


def test_controlnet(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionControlNetPipeline, folders / "controlnet")
    args = dict(prompt=PROMPT, image=make_image(seed=9), height=32, width=32)
    ours = run(fast, **args)
    assert_parity(ours, run(plain, **args), "controlnet")
    assert_differs(ours, run(fast, **args, controlnet_conditioning_scale=0.0), "controlnet residuals")


def _halve_latents_at_step_1(pipe, step, timestep, callback_kwargs):
    calls.append(step)
    return {"latents": callback_kwargs["latents"] * 0.5} if step == 1 else {}


calls: list = []


def test_callback_latents_output_and_images_per_prompt(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i",
                                        "EulerAncestralDiscreteScheduler")
    args = dict(prompt=[PROMPT, "a dog"], num_images_per_prompt=2, callback_on_step_end=_halve_latents_at_step_1)
    calls.clear()
    ours = run(fast, **args)
    assert calls == list(range(STEPS))
    theirs = run(plain, **args)
    assert ours.shape == (4, 32, 32, 3)
    assert_parity(ours, theirs, "callback, 2 prompts x 2 images")
    assert_differs(ours, run(plain, prompt=[PROMPT, "a dog"], num_images_per_prompt=2), "callback")

    latents = run(fast, **args, output_type="latent")
    assert latents.shape == (4, 4, LATENT, LATENT) and latents.dtype == torch.float32
    assert float((latents - run(plain, **args, output_type="latent")).abs().max()) <= PARITY


def test_fused_lora(folders):
    def lora(pipe):
        pipe.load_lora_weights(folders / "lora", weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora()

    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i", prepare=lora)
    ours = run(fast, prompt=PROMPT)
    assert_parity(ours, run(plain, prompt=PROMPT), "fused LoRA")
    assert_differs(ours, run(load(diffusers.StableDiffusionPipeline, folders / "t2i"), prompt=PROMPT), "LoRA")


# -- bf16 --------------------------------------------------------------------------------------

def test_bf16_within_the_tolerance_table(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i", dtype="bf16")
    assert fast.unet.model.dtype == fast.vae.model.dtype == torch.bfloat16
    assert fast.unet.dtype == fast.vae.dtype == torch.float32  # what the pipeline sees: latents stay fp32
    assert fastdiff.accelerate(fast) is fast and fast.unet.model.dtype == torch.bfloat16  # dtype=None: unchanged
    truth = torch.from_numpy(run(plain, prompt=PROMPT))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_error = rel_error(torch.from_numpy(run(plain, prompt=PROMPT)), truth)
    ours = run(fast, prompt=PROMPT)
    assert ours.dtype == np.float32
    bound = max(LOW_PRECISION_FACTOR * autocast_error, LOW_PRECISION_FLOOR[torch.bfloat16])
    error = rel_error(torch.from_numpy(ours), truth)
    print(f"bf16: relative error {error:.2e}, bound {bound:.2e} (diffusers' autocast error {autocast_error:.2e})")
    assert error <= bound


# -- the API -------------------------------------------------------------------------------------

def test_accelerate_is_callable_by_either_name(folders):
    import fastdiff.accelerate as module  # binds the name fastdiff.accelerate to the module

    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    assert fastdiff.accelerate(pipe) is pipe and module.accelerate(pipe) is pipe  # again: unchanged
    with pytest.raises(UnsupportedError, match="already accelerated in torch.float32"):
        fastdiff.accelerate(pipe, dtype=torch.bfloat16)


def test_pipeline_moves_and_reports(folders):
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.to("cpu") is pipe
    assert pipe.unet.config.sample_size == LATENT and pipe.vae.config.scaling_factor == 0.18215
    with pytest.raises(UnsupportedError, match="changing the dtype"):
        pipe.unet.to(torch.bfloat16)


@pytest.mark.parametrize("dtype, match", [("int8", "dtype: expected a torch.dtype"),
                                          (torch.float16, "dtype: float16 does not run on cpu")])
def test_bad_dtype_is_named(folders, dtype, match):
    with pytest.raises(PipelineError, match=match):
        fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"), dtype=dtype)


def test_not_a_unet_pipeline():
    with pytest.raises(TypeError, match="pipe: expected a diffusers pipeline with a `unet` and a `vae`"):
        fastdiff.accelerate(object())


def test_unknown_unet_and_vae_classes(folders):
    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    other = diffusers.UNet2DModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                                  up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, sample_size=8)
    with pytest.raises(UnsupportedError, match="pipe.unet: UNet2DModel is not supported"):
        fastdiff.accelerate(types.SimpleNamespace(unet=other, vae=pipe.vae))
    with pytest.raises(UnsupportedError, match="pipe.vae: UNet2DModel is not supported"):
        fastdiff.accelerate(types.SimpleNamespace(unet=pipe.unet, vae=other))


def test_vae_slicing_gives_the_same_images(folders):
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    whole = run(pipe, prompt=PROMPT, num_images_per_prompt=2)
    pipe.vae.enable_slicing()
    assert pipe.vae.use_slicing
    assert_parity(run(pipe, prompt=PROMPT, num_images_per_prompt=2), whole, "vae slicing")


# -- the pipeline's own methods: saving, dtype changes ------------------------------------------

def test_save_pretrained_writes_the_diffusers_unet_and_vae(folders, tmp_path):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i")
    fast.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert isinstance(fast.unet, DiffusersUNet) and isinstance(fast.vae, DiffusersVAE)  # still accelerated
    reloaded = load(diffusers.StableDiffusionPipeline, tmp_path / "saved")
    assert isinstance(reloaded.unet, diffusers.UNet2DConditionModel) and isinstance(reloaded.vae, diffusers.AutoencoderKL)
    theirs = run(plain, prompt=PROMPT)
    assert np.array_equal(run(reloaded, prompt=PROMPT), theirs), "the saved weights are the plain pipeline's"
    assert_parity(run(fast, prompt=PROMPT), theirs, "saved, still accelerated")
    assert_parity(run(fastdiff.accelerate(reloaded), prompt=PROMPT), theirs, "saved, reloaded, accelerated")

    fast.unet.save_pretrained(tmp_path / "unet")  # the models alone, as diffusers' own save them
    for name, model in (("unet", plain.unet), ("vae", plain.vae)):
        getattr(fast, name).save_pretrained(tmp_path / name)
        saved = type(model).from_pretrained(tmp_path / name).state_dict()
        assert saved.keys() == model.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), name


def test_save_pretrained_of_rounded_weights_is_refused_before_writing(folders, tmp_path):
    """bf16 compute on an fp32 pipeline: the fp32 weights are gone; saving rounded ones as fp32
    would pass them off as the original."""
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"), dtype="bf16")
    with pytest.raises(UnsupportedError, match=r"pipe.save_pretrained \(pipe.unet\): a diffusers model in torch.float32 "
                                               r"from one fastdiff.accelerate runs in torch.bfloat16 is not supported"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(UnsupportedError, match="DiffusersVAE.save_pretrained"):
        pipe.vae.save_pretrained(tmp_path / "vae")
    assert not (tmp_path / "vae").exists()


@pytest.mark.parametrize("call", [lambda p: p.to(torch.bfloat16), lambda p: p.to("cpu", torch.bfloat16),
                                  lambda p: p.to(dtype=torch.bfloat16)], ids=["dtype", "device_dtype", "keyword"])
def test_dtype_change_is_refused_before_any_component_is_converted(folders, call):
    """diffusers converts the components one by one, the text encoder before the UNet: the refusal
    must come first, for the pipeline accelerate saw and for one built from its components."""
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    img2img = fastdiff.accelerate(diffusers.StableDiffusionImg2ImgPipeline(**pipe.components))
    for p in (pipe, img2img):
        with pytest.raises(UnsupportedError, match=r"pipe.to\(torch.bfloat16\) \(pipe.unet\): changing the dtype "
                                                   r"of an accelerated model \(torch.float32 to torch.bfloat16\)"):
            call(p)
        assert p.text_encoder.dtype == p.unet.dtype == p.vae.dtype == p.unet.model.dtype == torch.float32
        assert p.to(torch.float32) is p and p.to("cpu", dtype=torch.float32) is p  # no change: fine
    assert_parity(run(pipe, prompt=PROMPT), run(load(diffusers.StableDiffusionPipeline, folders / "t2i"), prompt=PROMPT),
                  "after the refused .to")


def test_an_fp32_model_of_a_bf16_pipeline_saves_its_bf16_weights(folders, tmp_path):
    """dtype="fp32" on a bf16 pipeline widens the weights; saving narrows them back exactly."""
    plain = load(diffusers.StableDiffusionPipeline, folders / "t2i").to(torch.bfloat16)
    weights = {k: v.clone() for k, v in plain.unet.state_dict().items()}
    pipe = fastdiff.accelerate(plain, dtype="fp32")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.unet.model.dtype == torch.float32
    pipe.save_pretrained(tmp_path / "saved")
    saved = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet", torch_dtype=torch.bfloat16)
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in weights.items())


# -- diffusers' model surface ------------------------------------------------------------------------

def test_properties_and_forward_signature_are_diffusers(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i")
    for name in ("unet", "vae"):
        ours, theirs = getattr(fast, name), getattr(plain, name)
        assert (ours.dtype, ours.device, dict(ours.config)) == (theirs.dtype, theirs.device, dict(theirs.config)), name
        assert {k: type(v) for k, v in ours.attn_processors.items()} == \
            {k: type(v) for k, v in theirs.attn_processors.items()}, name
    # pipelines and ControlNet code call the UNet positionally too
    assert list(inspect.signature(DiffusersUNet.forward).parameters) == \
        list(inspect.signature(diffusers.UNet2DConditionModel.forward).parameters)
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        theirs = plain.unet(sample, 10, context, None, None, None, None, None, None, None, None, None, False)[0]
        ours = fast.unet(sample, 10, context, None, None, None, None, None, None, None, None, None, False)[0]
        assert rel_error(ours, theirs) <= 1e-5
        # class labels: diffusers ignores them in a UNet without class embeddings (the only kind accelerated)
        assert torch.equal(fast.unet(sample, 10, context, class_labels=None).sample, ours)
        assert torch.equal(fast.unet(sample, 10, context, torch.tensor([1, 2])).sample, ours)
        assert torch.equal(plain.unet(sample, 10, context, torch.tensor([1, 2])).sample, theirs)


def test_attention_processors_as_diffusers_sets_them(folders):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    before = run(pipe, prompt=PROMPT)
    for model in (pipe.unet, pipe.vae):
        names = list(model.attn_processors)
        model.set_attn_processor(AttnProcessor())
        assert list(model.attn_processors) == names
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}
        model.set_attn_processor({name: AttnProcessor2_0() for name in names})
        model.set_default_attn_processor()
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}

        class ScaledProcessor(AttnProcessor2_0):
            pass

        with pytest.raises(UnsupportedError, match="set_attn_processor: attention processors \\['ScaledProcessor'\\]"):
            model.set_attn_processor({**model.attn_processors, names[0]: ScaledProcessor()})
        with pytest.raises(ValueError, match="a dict of processors needs the"):  # diffusers: ValueError too
            model.set_attn_processor({names[0]: AttnProcessor()})
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}  # left as it was
    assert_parity(run(pipe, prompt=PROMPT), before, "default processors set again")


def test_fused_qkv_projections(folders):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionPipeline, folders / "t2i")
    for pipe in (plain, fast):
        pipe.fuse_qkv_projections()
    for name in ("unet", "vae"):
        assert {type(p).__name__ for p in getattr(fast, name).attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert_parity(run(fast, prompt=PROMPT), run(plain, prompt=PROMPT), "fused QKV projections")
    fast.unfuse_qkv_projections()
    for name in ("unet", "vae"):
        assert {type(p).__name__ for p in getattr(fast, name).attn_processors.values()} == {"AttnProcessor2_0"}
    fast.fuse_qkv_projections(vae=False)
    assert fast.fusing_unet and not fast.fusing_vae


def test_freeu_is_refused_and_disabling_it_works(folders):
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    for enable in (lambda: pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4), lambda: pipe.unet.enable_freeu(0.9, 0.2, 1.2, 1.4)):
        with pytest.raises(UnsupportedError, match="FreeU"):
            enable()
    pipe.disable_freeu()  # as on a plain pipeline without FreeU: nothing to undo
    assert_parity(run(pipe, prompt=PROMPT), run(load(diffusers.StableDiffusionPipeline, folders / "t2i"), prompt=PROMPT),
                  "FreeU refused")


# -- refused features ----------------------------------------------------------------------------

def _sd_pipe_with_unet(folders, **unet_config):
    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    config = {**pipe.unet.config, **unet_config}
    pipe.unet = diffusers.UNet2DConditionModel.from_config(config)
    return pipe


@pytest.mark.parametrize("config", [
    # diffusers' own tiny test UNet: attention_head_dim at its default 8, and block 0 (4 channels,
    # a DownBlock2D and UpBlock2D) has no attention, so its head count is never used
    dict(block_out_channels=(4, 8), norm_num_groups=1, attention_head_dim=8),
    # 40 channels in 3 heads: diffusers floors the head size (13; inner dim 39)
    dict(block_out_channels=(32, 40), norm_num_groups=8, attention_head_dim=3),
], ids=["attention_free_block", "head_size_floored"])
def test_head_counts_are_checked_only_where_attention_runs(folders, config):
    pipe = _sd_pipe_with_unet(folders, **config)
    perturbed(pipe.unet, 7)
    plain_unet, theirs = pipe.unet, run(pipe, prompt=PROMPT)
    fastdiff.accelerate(pipe)
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        error = rel_error(pipe.unet(sample, 10, context).sample, plain_unet(sample, 10, context).sample)
    assert error <= 1e-5, f"UNet output: relative error {error:.2e}"
    assert_parity(run(pipe, prompt=PROMPT), theirs, f"block_out_channels {config['block_out_channels']}")


@pytest.mark.parametrize("config, feature", [
    (dict(class_embed_type="timestep"), "class embeddings"),
    (dict(addition_embed_type="text"), "'addition_embed_type'='text' is not supported"),  # SDXL's 'text_time' runs
])
def test_unsupported_unet_configs(folders, config, feature):
    pipe = _sd_pipe_with_unet(folders, **config)
    with pytest.raises(UnsupportedError, match=feature):
        fastdiff.accelerate(pipe)
    assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)  # left as it was


def test_unfused_lora_and_lora_scale_are_refused(folders):
    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    pipe.load_lora_weights(folders / "lora", weight_name="pytorch_lora_weights.safetensors")
    with pytest.raises(UnsupportedError, match="unfused LoRA"):
        fastdiff.accelerate(pipe)
    pipe.fuse_lora()
    fastdiff.accelerate(pipe)
    with pytest.raises(UnsupportedError, match="cross_attention_kwargs.*LoRA scale"):
        run(pipe, prompt=PROMPT, cross_attention_kwargs={"scale": 0.5})


def test_custom_attention_processor_is_refused(folders):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class ScaledProcessor(AttnProcessor2_0):
        pass

    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    pipe.unet.set_attn_processor(ScaledProcessor())
    with pytest.raises(UnsupportedError, match="attention processors \\['ScaledProcessor'\\]"):
        fastdiff.accelerate(pipe)


def test_freeu_and_vae_tiling_are_refused(folders):
    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(UnsupportedError, match="FreeU"):
        fastdiff.accelerate(pipe)
    pipe = load(diffusers.StableDiffusionPipeline, folders / "t2i")
    pipe.vae.enable_tiling()
    with pytest.raises(UnsupportedError, match="tiled decoding"):
        fastdiff.accelerate(pipe)
    pipe = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, folders / "t2i"))
    with pytest.raises(UnsupportedError, match="tiled decoding"):
        pipe.vae.enable_tiling()
    with pytest.raises(UnsupportedError, match="FreeU"):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


# -- UNet2DCondition's ControlNet residuals, against diffusers' UNet -----------------------------

def test_unet_controlnet_residuals_match_diffusers():
    reference = tiny_unet(4, 8)
    ours = UNet2DCondition.from_diffusers(reference)
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 5, 32, generator=g)
    # the skips' shapes, from diffusers' own ControlNet
    down, mid = tiny_controlnet(reference)(sample, 10, context, torch.randn(2, 3, 24, 20, generator=g),
                                           return_dict=False)
    down = [torch.randn(r.shape, generator=g) for r in down]
    mid = torch.randn(mid.shape, generator=g)
    with torch.no_grad():
        theirs = reference(sample, 10, context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
        plain = reference(sample, 10, context).sample
    got = ours(sample, 10, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert rel_error(got, theirs) <= 1e-4
    assert rel_error(plain, theirs) > 1e-2  # the residuals matter
    with pytest.raises(ValueError, match="down_block_additional_residuals: expected 6 tensors"):
        ours(sample, 10, context, down_block_additional_residuals=down[:-1])
    with pytest.raises(ValueError, match="mid_block_additional_residual: expected shape"):
        ours(sample, 10, context, mid_block_additional_residual=mid[:, :, :1])
