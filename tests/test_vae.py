"""fastdiff.AutoencoderKL against diffusers' AutoencoderKL with the same weights (tiny configs)."""
import copy
import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402
from fastdiff.models.checkpoint import CheckpointError  # noqa: E402
from fastdiff.models.vae import AutoencoderKL, AutoencoderKLConfig, pil_to_tensor, tensor_to_pil  # noqa: E402
from helpers import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, backend_param, rel_error  # noqa: E402

FP32_MODEL_BOUND = 1e-4  # a whole VAE: dozens of convs and norms, each within fp32 rounding
BACKENDS = [backend_param("reference"), backend_param("cpp")]

CONFIGS = {
    # latent_channels 4 (SD) and 3 (MobileDiffusion), groups 8..32, one or two resnets per block
    "c4_g32": dict(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, layers_per_block=1),
    "c3_g8": dict(block_out_channels=(32, 64), latent_channels=3, norm_num_groups=8, layers_per_block=2, scaling_factor=0.5),
    "c4_g16_3lvl": dict(block_out_channels=(32, 64, 64), latent_channels=4, norm_num_groups=16, layers_per_block=1),
}


def diffusers_vae(fields, seed=0):
    n = len(fields["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  sample_size=32, **fields).eval()
    with torch.no_grad():  # norms start at (1, 0) and biases at 0: perturb everything so each weight matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def image(shape=(2, 3, 16, 24), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


@functools.lru_cache(maxsize=None)
def float64_truth(name):
    """diffusers' encode mode and decode output in float64 (shared by the backends' tests)."""
    ref = diffusers_vae(CONFIGS[name])
    x = image()
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()
        mode = ref64.encode(x.double()).latent_dist.mode()
        latents = torch.randn(mode.shape, generator=torch.Generator().manual_seed(2))
        return ref, x, mode, latents, ref64.decode(latents.double()).sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers_fp32(name, backend):
    ref, x, mode_truth, latents, image_truth = float64_truth(name)
    vae = AutoencoderKL.from_diffusers(ref)
    assert isinstance(vae, fastdiff.AutoencoderKL) and vae.scaling_factor == ref.config.scaling_factor
    f = vae.config.downscale
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        z = vae.encode(x)
        assert z.shape == (2, CONFIGS[name]["latent_channels"], 16 // f, 24 // f)
        assert rel_error(z, mode_truth) <= FP32_MODEL_BOUND, f"encode: {rel_error(z, mode_truth):.3e}"
        out = vae.decode(latents)
        assert out.shape == (2, 3, 16, 24) and out.is_contiguous()
        assert rel_error(out, image_truth) <= FP32_MODEL_BOUND, f"decode: {rel_error(out, image_truth):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_torch_error(backend):
    ref = diffusers_vae(CONFIGS["c4_g32"])
    vae = AutoencoderKL.from_diffusers(ref, dtype=torch.bfloat16)
    x = image(dtype=torch.bfloat16)
    latents = torch.randn(2, 4, 8, 12).bfloat16()
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        for run_ours, run_ref, arg in (
            (vae.encode, lambda m, a: m.encode(a).latent_dist.mode(), x),
            (vae.decode, lambda m, a: m.decode(a).sample, latents),
        ):
            truth = run_ref(ref.double(), arg.double())
            torch_err = rel_error(run_ref(ref.bfloat16(), arg), truth)
            out = run_ours(arg)
            assert out.dtype == torch.bfloat16
            bound = max(LOW_PRECISION_FACTOR * torch_err, LOW_PRECISION_FLOOR[torch.bfloat16])
            assert rel_error(out, truth) <= bound, f"{rel_error(out, truth):.3e} > {bound:.3e} (torch: {torch_err:.3e})"


def test_head_dim_above_ops_limit():
    """A 320-channel mid block: one head of dim 320 > ops.attention's 256 (SD's VAE has 512)."""
    ref = diffusers_vae(dict(block_out_channels=(32, 320), latent_channels=4, norm_num_groups=32, layers_per_block=1))
    vae = AutoencoderKL.from_diffusers(ref)
    x = image((1, 3, 16, 16))
    with torch.no_grad():
        assert rel_error(vae.encode(x), ref.double().encode(x.double()).latent_dist.mode()) <= FP32_MODEL_BOUND


def test_sample_matches_latent_dist_sample():
    ref = diffusers_vae(CONFIGS["c3_g8"])
    vae = AutoencoderKL.from_diffusers(ref)
    x = image()
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    got = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert rel_error(got, expected) <= FP32_MODEL_BOUND
    assert not torch.allclose(got, vae.encode(x))


@pytest.mark.parametrize("layout", ["model_folder_safetensors", "pipeline_folder_bin"])
def test_saved_folder_round_trip(tmp_path, layout):
    ref = diffusers_vae(CONFIGS["c3_g8"])
    if layout == "model_folder_safetensors":
        folder = tmp_path / "vae_model"
        ref.save_pretrained(folder)
        load_from = folder
    else:  # a pipeline folder: <root>/vae/config.json + diffusion_pytorch_model.bin
        ref.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=False)
        load_from = tmp_path / "pipe"
    vae = AutoencoderKL.from_diffusers(load_from)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name
    assert vae.config == AutoencoderKLConfig.from_diffusers(ref.config)
    x = image()
    with torch.no_grad():
        assert rel_error(vae.decode(vae.encode(x)), ref.decode(ref.encode(x).latent_dist.mode()).sample) <= FP32_MODEL_BOUND


def test_old_attention_names_load(tmp_path):
    """SD1.x-era VAE files name the mid-block attention query/key/value/proj_attn."""
    ref = diffusers_vae(CONFIGS["c4_g32"])
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in ref.state_dict().items():
        for new_name, old_name in renames.items():
            k = k.replace(new_name, old_name) if ".mid_block.attentions." in k else k
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(ref.config))
    vae.load_state_dict(old)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name


def test_latent_scaling():
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def test_pil_round_trip():
    pytest.importorskip("PIL")
    pixels = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(0)).float()
    images = pixels / 127.5 - 1
    pil = tensor_to_pil(images)
    assert len(pil) == 2 and pil[0].size == (7, 5) and pil[0].mode == "RGB"
    back = pil_to_tensor(pil)
    assert back.shape == (2, 3, 5, 7) and back.min() >= -1 and back.max() <= 1
    torch.testing.assert_close(back, images, rtol=0, atol=1e-6)
    assert tensor_to_pil(torch.full((1, 3, 2, 2), 3.0))[0].getpixel((0, 0)) == (255, 255, 255)  # clamped


def test_errors():
    ref = diffusers_vae(CONFIGS["c4_g32"])
    vae = AutoencoderKL.from_diffusers(ref)
    with pytest.raises(ValueError, match="images"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(TypeError, match="latents"):
        vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKLConfig.from_diffusers({**ref.config, "down_block_types": ["DownBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="unknown"):
        AutoencoderKLConfig.from_diffusers({**ref.config, "spatial_norm": True})
    state = ref.state_dict()
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.bias.*unexpected keys: decoder\.extra\.weight"):
        AutoencoderKL(AutoencoderKLConfig.from_diffusers(ref.config)).load_state_dict(state)
