"""SDXL on fastdiff: the UNet's added conditioning (addition_embed_type "text_time": the pooled text
embedding and the size/crop ids), transformer_layers_per_block > 1, against diffusers' UNet on the
same random weights; the SDXL pipelines accelerated against the plain ones, on tiny random models
built as diffusers' own SDXL tests build them (get_dummy_components); the real architecture only as
a parameter check on the meta device (no full-size compute here).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.models.unet_2d_condition import UNet2DCondition, UNet2DConditionConfig  # noqa: E402
from fastdiff.validate import rel_error  # noqa: E402
from test_pipeline import perturbed  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

UNET_PARITY = 1e-5  # relative error of one UNet call, fp32
POOLED = 32  # text_encoder_2's projection width in the tiny models
TIME_IDS = 6  # original size, crop top-left, target size
TIME_ID_DIM = 8  # addition_time_embed_dim


def sdxl_unet(in_channels=4, seed=0, **config):
    """diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components UNet (perturbed so every
    parameter matters): 80 = 32 pooled + 6 ids x 8."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{
        **dict(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=TIME_ID_DIM, transformer_layers_per_block=(1, 2),
               projection_class_embeddings_input_dim=POOLED + TIME_IDS * TIME_ID_DIM, cross_attention_dim=64,
               norm_num_groups=1),
        **config})
    return perturbed(unet, seed)


def unet_inputs(batch=2, seed=3, side=16):
    g = torch.Generator().manual_seed(seed)
    sample, context = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 7, 64, generator=g)
    text_embeds = torch.randn(batch, POOLED, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 40, 3, 5, 64, 64]])[:batch]  # two sizes and crops
    return sample, context, text_embeds, time_ids


# -- the UNet ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {},  # diffusers' own tiny SDXL UNet: transformer_layers_per_block (1, 2)
    dict(block_out_channels=(32, 64), norm_num_groups=8, transformer_layers_per_block=3),  # an int > 1 everywhere
    dict(block_out_channels=(32, 64), norm_num_groups=8, transformer_layers_per_block=((1, 2), (2, 3)),
         reverse_transformer_layers_per_block=((3, 1, 2), (1, 1, 2))),  # per layer, and SDXL-refiner-style reversed
], ids=["diffusers_dummy", "int_layers", "per_layer_tuples"])
def test_unet_text_time_matches_diffusers(config):
    reference = sdxl_unet(**config)
    ours = UNet2DCondition.from_diffusers(reference)
    assert ours.add_embedding.linear_1.weight.shape == reference.add_embedding.linear_1.weight.shape
    sample, context, text_embeds, time_ids = unet_inputs()
    with torch.no_grad():
        theirs = reference(sample, 10, context, added_cond_kwargs=dict(text_embeds=text_embeds, time_ids=time_ids)).sample
        other_ids = reference(sample, 10, context, added_cond_kwargs=dict(text_embeds=text_embeds,
                                                                          time_ids=time_ids.flip(0))).sample
        other_text = reference(sample, 10, context, added_cond_kwargs=dict(text_embeds=-text_embeds,
                                                                           time_ids=time_ids)).sample
    error = rel_error(ours(sample, 10, context, text_embeds=text_embeds, time_ids=time_ids), theirs)
    print(f"SDXL UNet {config}: relative error {error:.2e}")
    assert error <= UNET_PARITY
    # both parts of the added conditioning reach the output: the check above can fail
    assert rel_error(other_ids, theirs) > 1e-3 and rel_error(other_text, theirs) > 1e-3


def test_unet_text_time_errors_name_the_argument():
    ours = UNet2DCondition.from_diffusers(sdxl_unet())
    sample, context, text_embeds, time_ids = unet_inputs()
    with pytest.raises(ValueError, match="text_embeds: this UNet .*'text_time'.* needs text_embeds"):
        ours(sample, 10, context)
    with pytest.raises(ValueError, match="time_ids: this UNet"):
        ours(sample, 10, context, text_embeds=text_embeds)
    with pytest.raises(ValueError, match="widths 32 \\+ 5 x 8 .* projection_class_embeddings_input_dim 80"):
        ours(sample, 10, context, text_embeds=text_embeds, time_ids=time_ids[:, :5])
    with pytest.raises(ValueError, match="text_embeds: expected shape \\(2, n\\) for a batch of 2"):
        ours(sample, 10, context, text_embeds=text_embeds[:1], time_ids=time_ids)
    with pytest.raises(TypeError, match="time_ids: expected a floating-point"):
        ours(sample, 10, context, text_embeds=text_embeds, time_ids=time_ids.long())
    from test_pipeline import tiny_unet

    plain = UNet2DCondition.from_diffusers(tiny_unet(4, 2))
    with pytest.raises(ValueError, match="text_embeds: this UNet has no added conditioning"):
        plain(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 5, 32), text_embeds=torch.zeros(1, 32))


@pytest.mark.parametrize("config, match", [
    (dict(addition_embed_type="text"), "'addition_embed_type'='text' is not supported"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=None, projection_class_embeddings_input_dim=80),
     "'addition_time_embed_dim': addition_embed_type 'text_time' needs a positive int, got None"),
])
def test_unsupported_added_conditioning_is_named(config, match):
    with pytest.raises(ValueError, match=match):
        UNet2DConditionConfig(**config)


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (its non-default fields)
SDXL_BASE_UNET = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    upcast_attention=None, use_linear_projection=True)


@pytest.mark.parametrize("in_channels", [4, 9], ids=["base", "inpaint"])
def test_real_sdxl_architecture_on_the_meta_device(in_channels):
    """The full-size SDXL UNet (2.57 B parameters) is built from its config with diffusers' parameter
    names and shapes, so its checkpoint loads without a converter; nothing is allocated or run."""
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config({**SDXL_BASE_UNET, "in_channels": in_channels})
        ours = UNet2DCondition(UNet2DConditionConfig.from_diffusers(reference.config))
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    if in_channels == 4:
        assert count == 2_567_463_684  # SDXL base's published UNet size
    assert ours.add_embedding.linear_1.in_features == 2816 and ours.add_time_proj.num_channels == 256


# -- the SDXL pipelines, accelerated ------------------------------------------------------------------

IMAGE_PARITY = 1e-4  # max |pixel difference| in [0, 1], fp32 (the cases print theirs: 1e-6..2e-5)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                      timestep_spacing="leading")  # diffusers' SDXL tests'
WIDE = dict(block_out_channels=(32, 64), norm_num_groups=8)  # heads of 16 channels: fastdiff's fast attention runs


def sdxl_text_encoders(seed=0):
    """get_dummy_components' two CLIP text encoders (hidden 32: their penultimate states side by side
    make the UNet's 64-wide context; text_encoder_2's 32-wide projection is the pooled embedding)."""
    import transformers

    config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                         intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                                         num_hidden_layers=3, vocab_size=1000, hidden_act="gelu", projection_dim=POOLED)
    torch.manual_seed(seed)
    text_encoder = perturbed(transformers.CLIPTextModel(config), seed)
    text_encoder_2 = perturbed(transformers.CLIPTextModelWithProjection(config), seed + 1)
    return text_encoder, text_encoder_2


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """diffusers-saved SDXL pipelines: "sdxl" (4-channel UNet) and "inpaint" (9 channels); the
    tokenizer and VAE are test_pipeline's tiny ones."""
    from test_pipeline import tiny_parts

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer, _, vae = tiny_parts(root)
    text_encoder, text_encoder_2 = sdxl_text_encoders()
    common = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                  tokenizer_2=tokenizer, scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER))
    diffusers.StableDiffusionXLPipeline(unet=sdxl_unet(4, 1, **WIDE), **common).save_pretrained(root / "sdxl")
    diffusers.StableDiffusionXLInpaintPipeline(unet=sdxl_unet(9, 2, **WIDE), **common).save_pretrained(root / "inpaint")
    return root


def load(cls, folder, **kwargs):
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_and_accelerated(cls, folder, **kwargs):
    import fastdiff

    return load(cls, folder, **kwargs), fastdiff.accelerate(load(cls, folder, **kwargs))


def sdxl_images(pipe, seed=0, **kwargs):
    kwargs = {"prompt": "a red cat", "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def assert_image_parity(ours, theirs, label):
    assert ours.shape == theirs.shape, f"{label}: shape {ours.shape} vs {theirs.shape}"
    diff = float(abs(ours - theirs).max())
    print(f"parity {label}: max |diff| = {diff:.2e}")
    assert diff <= IMAGE_PARITY, f"{label}: max |pixel diff| {diff:.2e} > {IMAGE_PARITY}"


def assert_differs(a, b, label):
    assert float(abs(a - b).max()) > 100 * IMAGE_PARITY, f"{label}: no visible effect, the parity check proves nothing"


def test_sdxl_text_to_image(sdxl_folders):
    from fastdiff.accelerate import DiffusersUNet

    plain, fast = plain_and_accelerated(diffusers.StableDiffusionXLPipeline, sdxl_folders / "sdxl")
    assert isinstance(fast.unet, DiffusersUNet) and fast.unet.add_embedding.linear_1.in_features == 80
    theirs = sdxl_images(plain)
    assert theirs.shape == (1, 64, 64, 3)  # the UNet's sample_size 32 through the 2x VAE
    assert_image_parity(sdxl_images(fast), theirs, "SDXL text to image")
    # the added conditioning reaches the image: the size/crop ids and the negative prompt's pooled embedding
    conditioned = dict(original_size=(32, 48), crops_coords_top_left=(4, 0), negative_prompt="a dog",
                       num_images_per_prompt=2)
    theirs_conditioned = sdxl_images(plain, **conditioned)
    assert_image_parity(sdxl_images(fast, **conditioned), theirs_conditioned, "SDXL size/crop ids, negative prompt")
    assert_differs(theirs_conditioned[:1], theirs, "SDXL micro-conditioning")


def test_sdxl_image_to_image(sdxl_folders):
    from test_pipeline import make_image

    plain, fast = plain_and_accelerated(diffusers.StableDiffusionXLImg2ImgPipeline, sdxl_folders / "sdxl")
    args = dict(image=make_image(64, 64), strength=0.75, num_inference_steps=4)
    assert_image_parity(sdxl_images(fast, **args), sdxl_images(plain, **args), "SDXL image to image")


@pytest.mark.parametrize("folder", ["sdxl", "inpaint"], ids=["4_channels", "9_channels"])
def test_sdxl_inpaint(sdxl_folders, folder):
    import numpy as np
    from PIL import Image
    from test_pipeline import make_image

    plain, fast = plain_and_accelerated(diffusers.StableDiffusionXLInpaintPipeline, sdxl_folders / folder)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    args = dict(image=make_image(64, 64), mask_image=Image.fromarray(mask), height=64, width=64, strength=0.9)
    assert fast.unet.in_channels == plain.unet.config.in_channels
    assert_image_parity(sdxl_images(fast, **args), sdxl_images(plain, **args), f"SDXL inpaint, {folder}")


def test_sdxl_saves_as_diffusers(sdxl_folders, tmp_path):
    plain, fast = plain_and_accelerated(diffusers.StableDiffusionXLPipeline, sdxl_folders / "sdxl")
    fast.save_pretrained(tmp_path / "saved")
    reloaded = load(diffusers.StableDiffusionXLPipeline, tmp_path / "saved")
    assert isinstance(reloaded.unet, diffusers.UNet2DConditionModel)
    assert_image_parity(sdxl_images(reloaded), sdxl_images(plain), "SDXL saved after accelerate, reloaded plain")


@pytest.mark.parametrize("cls", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_sdxl_in_bf16_upcasts_the_vae_as_diffusers(sdxl_folders, cls):
    """A bf16 SDXL img2img / inpaint pipeline moves its VAE (force_upcast) to float32 to encode and
    back after: the accelerated VAE follows (float32 compute), returns to bf16 with the same
    weights, and the images stay within the tolerance table's bf16 bound of plain fp32."""
    import numpy as np
    from PIL import Image
    from fastdiff.accelerate import UnsupportedError
    from fastdiff.validate import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR
    from test_pipeline import make_image

    cls = getattr(diffusers, cls)
    folder = sdxl_folders / "sdxl"
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    args = dict(image=make_image(64, 64), strength=0.75, num_inference_steps=4)
    if cls is diffusers.StableDiffusionXLInpaintPipeline:
        args.update(mask_image=Image.fromarray(mask), height=64, width=64)
    truth = torch.from_numpy(sdxl_images(load(cls, folder), **args))
    plain, fast = plain_and_accelerated(cls, folder, torch_dtype=torch.bfloat16)
    weights = {k: v.clone() for k, v in fast.vae.model.state_dict().items()}
    ours = torch.from_numpy(sdxl_images(fast, **args))
    assert fast.vae.dtype == fast.vae.model.dtype == torch.bfloat16  # back after the upcast
    assert all(torch.equal(v, weights[k]) for k, v in fast.vae.model.state_dict().items())
    plain_error = rel_error(torch.from_numpy(sdxl_images(plain, **args)), truth)
    bound = max(LOW_PRECISION_FACTOR * plain_error, LOW_PRECISION_FLOOR[torch.bfloat16])
    error = rel_error(ours, truth)
    print(f"bf16 {cls.__name__}: relative error {error:.2e}, bound {bound:.2e} (plain bf16 {plain_error:.2e})")
    assert error <= bound
    with pytest.raises(UnsupportedError, match="changing the dtype"):  # only the upcast and its way back
        fast.vae.to(torch.float64)
    # what fp16 pipelines do around decoding (CUDA only: their check is for float16): upcast, read
    # post_quant_conv's dtype for the latents, decode, and back
    fast.vae.to(dtype=torch.float32)
    assert next(iter(fast.vae.post_quant_conv.parameters())).dtype == fast.vae.dtype == torch.float32
    fast.vae.to(dtype=torch.bfloat16)
    assert all(torch.equal(v, weights[k]) for k, v in fast.vae.model.state_dict().items())
