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
from test_pipeline import LATENT, tiny_parts, tiny_unet  # noqa: E402

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
