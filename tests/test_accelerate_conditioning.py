"""fastdiff.accelerate with extra conditioning of the UNet, against the plain diffusers pipeline:
LCM's guidance embedding (time_cond_proj_dim / timestep_cond) and IP-Adapter (image-prompt
tokens through added K/V). Tiny random models built here (no hub), as diffusers' own tests build
them; same generator seed for the plain and the accelerated pipeline.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.accelerate import DiffusersUNet, UnsupportedError  # noqa: E402
from fastdiff.models.unet_2d_condition import UNet2DCondition  # noqa: E402
from fastdiff.validate import rel_error  # noqa: E402
from test_accelerate import PROMPT, load  # noqa: E402
from test_pipeline import LATENT, SD_SCHEDULER, tiny_parts, tiny_unet  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

IMAGE_PARITY = 1e-5  # max |pixel difference| in [0, 1], fp32
UNET_PARITY = 1e-5  # relative error of one UNet call, fp32
GUIDANCE_DIM = 32  # time_cond_proj_dim, as diffusers' LCM tests
IMAGE_EMBED_DIM = 24  # the image encoder's projection width the IP-Adapter projects from


def lcm_unet(seed=2):
    """test_pipeline.tiny_unet with LCM's guidance projection (time_cond_proj_dim), randomly initialised."""
    base = tiny_unet(4, seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # it would reset the new field
    unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": GUIDANCE_DIM})
    missing, unexpected = unet.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    return unet.eval()


def unet_inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, LATENT, LATENT, generator=g), torch.randn(batch, 5, 32, generator=g)


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


def assert_differs(a, b, label):
    """The case must be able to fail: what is under test moves the image far beyond the parity bound."""
    assert max_diff(a, b) > 100 * IMAGE_PARITY, f"{label}: no visible effect, the parity check proves nothing"


def images(pipe, seed=0, **kwargs):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return dict(zip(("tokenizer", "text_encoder", "vae"), tiny_parts(tmp_path_factory.mktemp("conditioning_parts"))))


# -- LCM: the guidance embedding ---------------------------------------------------------------------

LCM_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False)


@pytest.fixture(scope="module")
def lcm_folder(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lcm") / "pipe"
    diffusers.LatentConsistencyModelPipeline(
        unet=lcm_unet(), scheduler=diffusers.LCMScheduler(**LCM_SCHEDULER),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        **parts).save_pretrained(folder)
    return folder


def test_unet_with_timestep_cond_matches_diffusers():
    reference = lcm_unet()
    ours = UNet2DCondition.from_diffusers(reference)
    assert ours.time_embedding.cond_proj.weight.shape == reference.time_embedding.cond_proj.weight.shape
    sample, context = unet_inputs()
    cond = torch.randn(2, GUIDANCE_DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = reference(sample, 10, context, timestep_cond=cond).sample
        theirs_without = reference(sample, 10, context).sample
    error = rel_error(ours(sample, 10, context, timestep_cond=cond), theirs)
    assert error <= UNET_PARITY, f"with timestep_cond: relative error {error:.2e}"
    assert rel_error(ours(sample, 10, context), theirs_without) <= UNET_PARITY  # optional, as in diffusers
    assert rel_error(theirs, theirs_without) > 1e-2  # the condition matters
    assert rel_error(ours(sample, 10, context, timestep_cond=cond[:1]),
                     reference(sample, 10, context, timestep_cond=cond[:1]).sample.detach()) <= UNET_PARITY


def test_timestep_cond_errors_name_it():
    ours = UNet2DCondition.from_diffusers(lcm_unet())
    sample, context = unet_inputs()
    with pytest.raises(ValueError, match=f"timestep_cond: expected shape \\(2, {GUIDANCE_DIM}\\)"):
        ours(sample, 10, context, timestep_cond=torch.zeros(2, GUIDANCE_DIM + 1))
    with pytest.raises(TypeError, match="timestep_cond: expected a floating-point"):
        ours(sample, 10, context, timestep_cond=torch.zeros(2, GUIDANCE_DIM, dtype=torch.long))
    plain = UNet2DCondition.from_diffusers(tiny_unet(4, 2))
    with pytest.raises(ValueError, match="timestep_cond: this UNet has no guidance embedding"):
        plain(sample, 10, context, timestep_cond=torch.zeros(2, GUIDANCE_DIM))


def test_latent_consistency_pipeline(lcm_folder):
    plain = load(diffusers.LatentConsistencyModelPipeline, lcm_folder)
    fast = fastdiff.accelerate(load(diffusers.LatentConsistencyModelPipeline, lcm_folder))
    assert isinstance(fast.unet, DiffusersUNet) and fast.unet.config.time_cond_proj_dim == GUIDANCE_DIM
    for guidance in (8.5, 2.0):
        kwargs = dict(num_inference_steps=4, guidance_scale=guidance)
        diff = max_diff(images(fast, **kwargs), images(plain, **kwargs))
        print(f"LCM guidance {guidance}: max |diff| = {diff:.2e}")
        assert diff <= IMAGE_PARITY, f"LCM, guidance {guidance}: max |pixel diff| {diff:.2e}"
    # the guidance reaches the image only through timestep_cond: the check above can fail
    assert_differs(images(plain, num_inference_steps=4, guidance_scale=8.5),
                   images(plain, num_inference_steps=4, guidance_scale=2.0), "LCM guidance embedding")


def test_fastdiff_pipeline_refuses_an_lcm_folder(lcm_folder):
    from fastdiff.pipeline import Pipeline
    from fastdiff.requests import PipelineError

    with pytest.raises(PipelineError, match="LCM UNet \\(time_cond_proj_dim=32\\).*LatentConsistencyModelPipeline"):
        Pipeline.from_pretrained(lcm_folder)


# -- IP-Adapter: image-prompt tokens through added K/V ----------------------------------------------

def ip_adapter_state_dict(unet, seed):
    """An IP-Adapter checkpoint for `unet` in the original format (as diffusers' tests build one):
    'image_proj' (ImageProjection, 4 tokens) and 'ip_adapter' ('{key_id}.to_k_ip/to_v_ip.weight',
    key_id 1, 3, 5, ... over the cross-attention layers), random."""
    g = torch.Generator().manual_seed(seed)
    cross_dim, ip_adapter = unet.config.cross_attention_dim, {}
    layers = [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")]
    for key_id, layer in zip(range(1, 2 * len(layers), 2), layers):
        hidden = unet.get_submodule(layer).to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key_id}.{kind}.weight"] = 0.3 * torch.randn(hidden, cross_dim, generator=g)
    image_proj = {"proj.weight": 0.2 * torch.randn(4 * cross_dim, IMAGE_EMBED_DIM, generator=g),
                  "proj.bias": 0.1 * torch.randn(4 * cross_dim, generator=g),
                  "norm.weight": 1 + 0.1 * torch.randn(cross_dim, generator=g),
                  "norm.bias": 0.1 * torch.randn(cross_dim, generator=g)}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def ip_folders(parts, tmp_path_factory):
    """An SD pipeline (test_pipeline.tiny_unet, PNDM) and two IP-Adapter checkpoints for it, written
    as load_ip_adapter reads them (safetensors, 'image_proj.' / 'ip_adapter.' prefixes)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ip_adapter")
    unet = tiny_unet(4, 2)
    diffusers.StableDiffusionPipeline(unet=unet, scheduler=diffusers.PNDMScheduler.from_config(SD_SCHEDULER),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      **parts).save_pretrained(root / "sd")
    for seed, name in ((11, "ip_a.safetensors"), (12, "ip_b.safetensors")):
        state = ip_adapter_state_dict(unet, seed)
        save_file({f"{part}.{k}": v.contiguous() for part, weights in state.items() for k, v in weights.items()},
                  root / name)
    return root


def load_ip(pipe, folder, names=("ip_a.safetensors",)):
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=list(names), image_encoder_folder=None)
    return pipe


def image_embeds(count=1, seed=21):
    """ip_adapter_image_embeds for classifier-free guidance: per adapter (negative, positive) rows of
    one image embedding each, (2, 1, IMAGE_EMBED_DIM)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g) for _ in range(count)]


IP_RUN = dict(num_inference_steps=3)


@pytest.mark.parametrize("when", ["before", "after"])
def test_ip_adapter_loaded_before_or_after_accelerate(ip_folders, when):
    sd = ip_folders / "sd"
    plain = load_ip(load(diffusers.StableDiffusionPipeline, sd), ip_folders)
    if when == "before":
        fast = fastdiff.accelerate(load_ip(load(diffusers.StableDiffusionPipeline, sd), ip_folders))
    else:
        fast = load_ip(fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, sd)), ip_folders)
    assert isinstance(fast.unet, DiffusersUNet) and fast.unet.model.num_ip_adapters == 1
    embeds = image_embeds()
    ours, theirs = images(fast, ip_adapter_image_embeds=embeds, **IP_RUN), images(plain, ip_adapter_image_embeds=embeds, **IP_RUN)
    diff = max_diff(ours, theirs)
    print(f"IP-Adapter loaded {when} accelerate: max |diff| = {diff:.2e}")
    assert diff <= IMAGE_PARITY, f"IP-Adapter ({when}): max |pixel diff| {diff:.2e}"
    without = images(load(diffusers.StableDiffusionPipeline, sd), **IP_RUN)
    assert_differs(theirs, without, "IP-Adapter image prompt")

    for scale in (0.6, {"up": {"block_0": [0.0, 1.0, 0.0]}}):  # a global scale, and InstantStyle's per-layer one
        for pipe in (fast, plain):
            pipe.set_ip_adapter_scale(scale)
        diff = max_diff(images(fast, ip_adapter_image_embeds=embeds, **IP_RUN),
                        images(plain, ip_adapter_image_embeds=embeds, **IP_RUN))
        assert diff <= IMAGE_PARITY, f"IP-Adapter scale {scale}: max |pixel diff| {diff:.2e}"

    fast.set_ip_adapter_scale(0.0)  # every adapter skipped: the images without one
    assert max_diff(images(fast, ip_adapter_image_embeds=embeds, **IP_RUN), without) <= IMAGE_PARITY
    fast.unload_ip_adapter()
    assert fast.unet.model.num_ip_adapters == 0 and fast.unet.encoder_hid_proj is None
    assert max_diff(images(fast, **IP_RUN), without) <= IMAGE_PARITY


def test_two_ip_adapters(ip_folders):
    names = ("ip_a.safetensors", "ip_b.safetensors")
    plain = load_ip(load(diffusers.StableDiffusionPipeline, ip_folders / "sd"), ip_folders, names)
    fast = load_ip(fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, ip_folders / "sd")), ip_folders, names)
    fast.set_ip_adapter_scale([0.8, 0.5])
    plain.set_ip_adapter_scale([0.8, 0.5])
    embeds = image_embeds(2)
    theirs = images(plain, ip_adapter_image_embeds=embeds, **IP_RUN)
    assert max_diff(images(fast, ip_adapter_image_embeds=embeds, **IP_RUN), theirs) <= IMAGE_PARITY
    plain.set_ip_adapter_scale([0.8, 0.0])
    assert_differs(theirs, images(plain, ip_adapter_image_embeds=embeds, **IP_RUN), "the second IP-Adapter")


def test_ip_adapter_refusals_leave_the_pipeline_as_it_was(ip_folders, tmp_path):
    fast = fastdiff.accelerate(load(diffusers.StableDiffusionPipeline, ip_folders / "sd"))
    processors = fast.unet.attn_processors
    face_id = ip_adapter_state_dict(tiny_unet(4, 2), 13)
    face_id["ip_adapter"]["1.to_k_lora.down.weight"] = torch.zeros(4, 32)
    with pytest.raises(UnsupportedError, match="FaceID"):
        fast.unet._load_ip_adapter_weights([face_id])
    assert fast.unet.attn_processors == processors and fast.unet.model.num_ip_adapters == 0
    with pytest.raises(ValueError, match="image_embeds.*no IP-Adapter is loaded"):
        images(fast, ip_adapter_image_embeds=image_embeds(), **IP_RUN)
    from test_pipeline import make_image

    with pytest.raises(AttributeError):  # plain diffusers: 'NoneType' object has no attribute 'image_projection_layers'
        images(load(diffusers.StableDiffusionPipeline, ip_folders / "sd"), ip_adapter_image=make_image(), **IP_RUN)
    with pytest.raises(ValueError, match="ip_adapter_image: no IP-Adapter is loaded; load one first"):
        images(fast, ip_adapter_image=make_image(), **IP_RUN)

    load_ip(fast, ip_folders)
    with pytest.raises(UnsupportedError, match="IP-Adapter.*unload_ip_adapter"):
        fast.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(UnsupportedError, match="cross_attention_kwargs"):  # ip_adapter_masks travel there
        images(fast, ip_adapter_image_embeds=image_embeds(), cross_attention_kwargs={"ip_adapter_masks": []}, **IP_RUN)
    with pytest.raises(ValueError, match="needs 'image_embeds'"):
        images(fast, **IP_RUN)


def test_ip_adapter_image_through_a_tiny_image_encoder(ip_folders):
    """ip_adapter_image: the pipeline's CLIP image encoder (tiny, built here) makes the embeddings."""
    import transformers
    from test_pipeline import make_image

    torch.manual_seed(14)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=IMAGE_EMBED_DIM, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=4)).eval()
    extractor = transformers.CLIPImageProcessor(size=32, crop_size=32)
    pipes = []
    for accelerated in (False, True):
        pipe = load(diffusers.StableDiffusionPipeline, ip_folders / "sd")
        pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)
        pipes.append(load_ip(fastdiff.accelerate(pipe) if accelerated else pipe, ip_folders))
    plain, fast = pipes
    theirs = images(plain, ip_adapter_image=make_image(), **IP_RUN)
    assert max_diff(images(fast, ip_adapter_image=make_image(), **IP_RUN), theirs) <= IMAGE_PARITY
    assert_differs(theirs, images(plain, ip_adapter_image=make_image(seed=9), **IP_RUN), "the image prompt")
