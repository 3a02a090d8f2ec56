"""fastdiff.AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny with the same weights, and
the tiny VAE in pipelines: vae="tiny" | DIR on from_pretrained, save_pipeline, the embedded default."""
import copy
import functools
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402
from fastdiff.default_model import SIZES, default_pipeline  # noqa: E402
from fastdiff.loading import save_pipeline  # noqa: E402
from fastdiff.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig  # noqa: E402
from fastdiff.models.checkpoint import CheckpointError  # noqa: E402
from fastdiff.pipeline import Pipeline, PipelineError  # noqa: E402
from helpers import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, backend_param, rel_error  # noqa: E402

FP32_MODEL_BOUND = 1e-4  # as tests/test_vae.py: a whole autoencoder within fp32 rounding
BACKENDS = [backend_param("reference"), backend_param("cpp")]

CONFIGS = {
    # SD's 4 latent channels and MobileDiffusion's 3; TAESD's block counts at a test width, and a 3-level one
    "c4": dict(latent_channels=4, encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4),
    "c3": dict(latent_channels=3, encoder_block_out_channels=(24,) * 4, decoder_block_out_channels=(24,) * 4),
    "c4_3lvl": dict(latent_channels=4, encoder_block_out_channels=(16,) * 3, decoder_block_out_channels=(16,) * 3,
                    num_encoder_blocks=(1, 2, 2), num_decoder_blocks=(2, 2, 1)),
}
IMAGE_SHAPE = (2, 3, 37, 50)  # odd sizes: the stride-2 convs round up (37 -> 19 -> 10 -> 5)


def diffusers_tiny(fields, seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderTiny(**fields).eval()
    with torch.no_grad():  # biases start at 0: perturb everything so each weight matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def image(shape=IMAGE_SHAPE, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


@functools.lru_cache(maxsize=None)
def float64_truth(name):
    """diffusers' encode and decode outputs in float64 (shared by the backends' tests)."""
    ref = diffusers_tiny(CONFIGS[name])
    x = image()
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()
        latents_truth = ref64.encode(x.double()).latents
        latents = 2 * torch.randn(latents_truth.shape, generator=torch.Generator().manual_seed(2))  # some past tanh's knee
        return ref, x, latents_truth, latents, ref64.decode(latents.double()).sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers_fp32(name, backend):
    ref, x, latents_truth, latents, image_truth = float64_truth(name)
    vae = AutoencoderTiny.from_diffusers(ref)
    assert isinstance(vae, fastdiff.AutoencoderTiny) and vae.dtype == torch.float32 and vae.device.type == "cpu"
    f, c = vae.config.downscale, CONFIGS[name]["latent_channels"]
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        z = vae.encode(x)
        assert z.shape == (2, c, -(-37 // f), -(-50 // f)) and z.is_contiguous()
        assert rel_error(z, latents_truth) <= FP32_MODEL_BOUND, f"encode: {rel_error(z, latents_truth):.3e}"
        out = vae.decode(latents)
        assert out.shape == (2, 3, latents.shape[2] * f, latents.shape[3] * f) and out.is_contiguous()
        assert rel_error(out, image_truth) <= FP32_MODEL_BOUND, f"decode: {rel_error(out, image_truth):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["c4", "c3"])
def test_bf16_within_twice_torch_error(name, backend):
    ref = diffusers_tiny(CONFIGS[name])
    vae = AutoencoderTiny.from_diffusers(ref, dtype=torch.bfloat16)
    x = image(dtype=torch.bfloat16)
    latents = torch.randn(2, CONFIGS[name]["latent_channels"], 5, 7).bfloat16()
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        for run_ours, run_ref, arg in ((vae.encode, lambda m, a: m.encode(a).latents, x),
                                       (vae.decode, lambda m, a: m.decode(a).sample, latents)):
            truth = run_ref(copy.deepcopy(ref).double(), arg.double())
            torch_err = rel_error(run_ref(copy.deepcopy(ref).bfloat16(), arg), truth)
            out = run_ours(arg)
            assert out.dtype == torch.bfloat16
            bound = max(LOW_PRECISION_FACTOR * torch_err, LOW_PRECISION_FLOOR[torch.bfloat16])
            assert rel_error(out, truth) <= bound, f"{rel_error(out, truth):.3e} > {bound:.3e} (torch: {torch_err:.3e})"


def test_parameter_names_are_diffusers():
    ref = diffusers_tiny(CONFIGS["c4"])
    vae = AutoencoderTiny(AutoencoderTinyConfig.from_diffusers(ref.config))
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_folder_round_trip(tmp_path):
    ref = diffusers_tiny(CONFIGS["c3"])
    ref.save_pretrained(tmp_path / "taesd")
    vae = AutoencoderTiny.from_diffusers(tmp_path / "taesd")
    for name, value in vae.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name
    assert vae.config == AutoencoderTinyConfig.from_diffusers(ref.config)
    x = image()
    with torch.no_grad():
        assert rel_error(vae.decode(vae.encode(x)), ref.decode(ref.encode(x).latents).sample) <= FP32_MODEL_BOUND


def test_latent_convention_is_diffusers_pipelines():
    """diffusers' pipelines decode `latents / scaling_factor` (1.0 for TAESD): fastdiff's
    unscale_latents must agree, and scale_latents invert it (not diffusers' 8-bit [0, 1] mapping)."""
    vae = AutoencoderTiny(**CONFIGS["c4"])
    z = 3 * torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(vae.unscale_latents(z), z / vae.config.scaling_factor)
    torch.testing.assert_close(vae.scale_latents(vae.unscale_latents(z)), z)
    shifted = AutoencoderTiny(**CONFIGS["c4"], scaling_factor=0.5, shift_factor=0.25)
    torch.testing.assert_close(shifted.scale_latents(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(shifted.unscale_latents(shifted.scale_latents(z)), z)


@pytest.mark.parametrize("fields, message", [
    (dict(act_fn="silu"), "act_fn"),
    (dict(upsample_fn="bilinear"), "upsample_fn"),
    (dict(decoder_block_out_channels=(16, 32, 16, 16)), "one width"),
    (dict(num_decoder_blocks=(3, 3, 1)), "differ in length"),
    (dict(num_decoder_blocks=(3, 3, 1), decoder_block_out_channels=(64,) * 3), "upscales by 4"),
])
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderTinyConfig(**fields)
    with pytest.raises(ValueError, match="unknown to fastdiff.AutoencoderTiny"):
        AutoencoderTinyConfig.from_diffusers({"latent_channels": 4, "use_quant_conv": True})


def test_wrong_input_and_missing_weights():
    vae = AutoencoderTiny(**CONFIGS["c4"])
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        vae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="float32"):
        vae.encode(image((1, 3, 16, 16), dtype=torch.bfloat16))
    state = vae.state_dict()
    state.pop("decoder.layers.0.weight")
    with pytest.raises(CheckpointError, match="decoder.layers.0.weight"):
        AutoencoderTiny(**CONFIGS["c4"]).load_state_dict(state)


# -- in pipelines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    """The small default generator with its KL VAE, written as a diffusers folder."""
    folder = tmp_path_factory.mktemp("pipes") / "kl"
    save_pipeline(default_pipeline("generate", "small", vae="kl"), folder)
    return folder


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    """A diffusers AutoencoderTiny folder for the small default's 3-channel latents."""
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    diffusers_tiny(dict(CONFIGS["c3"], encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4)).save_pretrained(folder)
    return folder


def test_embedded_default_decodes_with_the_tiny_vae():
    tiny, kl = default_pipeline("generate", "small"), default_pipeline("generate", "small", vae="kl")
    assert isinstance(tiny.vae, AutoencoderTiny) and type(kl.vae).__name__ == "AutoencoderKL"
    assert tiny.vae_scale == kl.vae_scale == 8 and tiny.latent_channels == 3
    assert type(default_pipeline("edit", "small").vae).__name__ == "AutoencoderKL"  # editors need KL image latents
    with pytest.raises(ValueError, match="vae"):
        default_pipeline("edit", "small", vae="tiny")
    out = tiny.generate("a cat", seed=0, output_type="pt", progress=False)
    latents = tiny.generate("a cat", seed=0, output_type="latent", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(out, (tiny.vae.decode(latents) / 2 + 0.5).clamp(0, 1))


def test_paper_size_default_uses_taesd_sizes():
    """Without building the 386M-parameter default: its entry is complete and its tiny VAE is TAESD's shape."""
    assert set(SIZES["mobilediffusion"]) == set(SIZES["small"])
    assert AutoencoderTinyConfig(latent_channels=3, **SIZES["mobilediffusion"]["tiny_vae"]) == AutoencoderTinyConfig(latent_channels=3)


def test_vae_dir_replaces_the_folders_vae(kl_folder, taesd_folder):
    pipe = Pipeline.from_pretrained(kl_folder, vae=taesd_folder)
    ref = diffusers.AutoencoderTiny.from_pretrained(taesd_folder).eval()
    assert isinstance(pipe.vae, AutoencoderTiny)
    latents = pipe.generate("a cat", seed=1, output_type="latent", progress=False)
    with torch.no_grad():  # diffusers' pipelines: decode(latents / scaling_factor), images to [0, 1]
        expected = (ref.decode(latents / ref.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    got = pipe.generate("a cat", seed=1, output_type="pt", progress=False)
    assert rel_error(got, expected) <= FP32_MODEL_BOUND
    bf16 = Pipeline.from_pretrained(kl_folder, vae=taesd_folder, dtype="bf16")
    assert bf16.vae.dtype == torch.bfloat16


def test_tiny_vae_round_trips_through_save_pipeline(kl_folder, taesd_folder, tmp_path):
    pipe = Pipeline.from_pretrained(kl_folder, vae=taesd_folder)
    save_pipeline(pipe, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    for vae in (None, "tiny"):  # vae/ names AutoencoderTiny: loaded as it is, and what "tiny" means
        loaded = Pipeline.from_pretrained(tmp_path / "saved", vae=vae)
        assert isinstance(loaded.vae, AutoencoderTiny) and loaded.vae.config == pipe.vae.config
        np.testing.assert_array_equal(loaded.generate("a cat", seed=2, output_type="np", progress=False),
                                      pipe.generate("a cat", seed=2, output_type="np", progress=False))
    # diffusers reads the written folder as its own AutoencoderTiny
    assert isinstance(diffusers.AutoencoderTiny.from_pretrained(tmp_path / "saved" / "vae"), diffusers.AutoencoderTiny)


def test_tiny_without_weights_is_refused(kl_folder, tmp_path):
    with pytest.raises(PipelineError, match="vae='tiny'.*pass vae=DIR"):
        Pipeline.from_pretrained(kl_folder, vae="tiny")
    with pytest.raises(PipelineError, match="no such directory"):
        Pipeline.from_pretrained(kl_folder, vae=tmp_path / "missing")


def test_tiny_vae_refused_for_an_editor(taesd_folder, tmp_path):
    save_pipeline(default_pipeline("edit", "small"), tmp_path / "edit")
    with pytest.raises(PipelineError, match="editor UNet"):
        Pipeline.from_pretrained(tmp_path / "edit", vae=taesd_folder)


def test_latent_channels_must_match(kl_folder, tmp_path):
    diffusers_tiny(CONFIGS["c4"]).save_pretrained(tmp_path / "taesd4")
    with pytest.raises(PipelineError, match="in_channels"):
        Pipeline.from_pretrained(kl_folder, vae=tmp_path / "taesd4")
