"""fastdiff.samplers against the diffusers schedulers, step by step: same timesteps, same model
inputs, same model outputs, same ancestral noise (same seeded generator, same draw order), and
latents within 1e-5 relative at every step."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff.samplers import SAMPLERS, make_sampler  # noqa: E402
from helpers import rel_error  # noqa: E402

BOUND = 1e-5
# diffusers 0.42's schedulers call np.array(tensor) in a way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM config; its extra keys are ignored)
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 (768px, v-prediction)
SD21_V = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
CONFIGS = {
    "sd15": SD15,
    "sd21_v": SD21_V,
    "linear_v": {**SD21_V, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {**SD15, "beta_schedule": "squaredcos_cap_v2"},
}

DIFFUSERS = {
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
SHAPE = (2, 4, 9, 7)  # two images of one request; odd latent map


def fake_unet(model_input, t, base):
    """Deterministic stand-in for the UNet: depends on the input and the timestep."""
    return 0.5 * torch.tanh(model_input) + 0.3 * torch.sin(float(t) / 97.0 + torch.as_tensor(base))


def run_both(name, config, num_steps, spacing=None, seed=0):
    """Both samplers on the same trajectory inputs; returns the max relative error over steps."""
    if spacing is not None:
        config = {**config, "timestep_spacing": spacing}
    cls, extra = DIFFUSERS[name]
    ref = cls.from_config({**config, **extra})
    ref.set_timesteps(num_steps)
    run = make_sampler(name, config).start(num_steps)

    assert torch.equal(run.timesteps, ref.timesteps.to(run.timesteps.dtype)), f"timesteps {run.timesteps} != {ref.timesteps}"
    assert run.timesteps.dtype == ref.timesteps.dtype
    assert math.isclose(run.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)

    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    g_ref, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ref = randn_tensor(SHAPE, generator=g_ref, dtype=torch.float32) * ref.init_noise_sigma  # as SD pipelines do
    x = run.initial_latents(SHAPE, generator=g_ours)
    assert rel_error(x, x_ref) <= 1e-6

    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = run.scale_model_input(x, i)
        worst = max(worst, rel_error(in_ours, in_ref))
        model_output = fake_unet(in_ref, t, base)  # the same model output for both
        x_ref = ref.step(model_output, t, x_ref, generator=g_ref).prev_sample
        x = run.step(model_output, i, x, generator=g_ours)
        err = rel_error(x, x_ref)
        assert err <= BOUND, f"{name} step {i}/{num_steps} (t={float(t)}): relative error {err:.3e} > {BOUND}"
        worst = max(worst, err)
    assert run.done
    return worst


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("num_steps", [20, 7])
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_matches_diffusers_default_spacing(name, config, num_steps):
    run_both(name, CONFIGS[config], num_steps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("config", ["sd15", "sd21_v"])
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_matches_diffusers_each_spacing(name, config, spacing):
    run_both(name, CONFIGS[config], 10, spacing)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("num_steps", [25, 14])
def test_dpmpp_2m_lower_order_final(final_sigmas_type, num_steps):
    """>= 15 steps with sigma_min keeps the last step second order; < 15 or sigma 0 makes it first order."""
    run_both("dpmpp_2m", {**SD15, "final_sigmas_type": final_sigmas_type}, num_steps)


def test_ddim_clip_sample():
    run_both("ddim", {**SD15, "clip_sample": True, "clip_sample_range": 0.5}, 8)


@pytest.mark.parametrize("config", ["sd15", "sd21_v"])
def test_one_step_x0_matches_single_trailing_ddim_step(config):
    """One DDIM step from t=999 with alpha_prev = 1 is exactly the x0 prediction."""
    cfg = CONFIGS[config]
    ref = diffusers.DDIMScheduler.from_config({**cfg, "timestep_spacing": "trailing", "set_alpha_to_one": True})
    ref.set_timesteps(1)
    run = make_sampler("x0", cfg).start(1)
    assert run.timesteps.tolist() == ref.timesteps.tolist() == [999]
    x = run.initial_latents(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(run.scale_model_input(x, 0), x)
    out = fake_unet(x, 999, torch.randn(SHAPE))
    expected = ref.step(out, ref.timesteps[0], x).prev_sample
    got = run.step(out, 0, x)
    assert rel_error(got, expected) <= BOUND
    assert not torch.allclose(got, x)  # a real transformation, not the identity


# ----------------------------------------------------------------------------------------------
# step counts: every count in 1..max_steps works (and matches diffusers); the rest are refused at
# `start`, where diffusers fails too (IndexError, NaN latents). Trajectories run on a 100-step
# training schedule (cheap); the boundaries fall alike at SD's 1000.

T = 100
SD15_T100 = {**SD15, "num_train_timesteps": T}
SPACINGS = ("linspace", "leading", "trailing")
# with steps_offset 1 (SD's): how far max_steps falls short of T, under linspace, leading, trailing
SHORTFALL = {
    "euler_ancestral": (0, 0, 0),
    "euler": (0, 0, 0),
    "ddim": (0, 1, 0),  # leading: t = T at T steps
    "dpmpp_2m": (1, 2, 0),  # linspace repeats a timestep at T steps; leading clamps two to T-1 at T-1
}


def diffusers_fails(name, config, num_steps):
    cls, extra = DIFFUSERS[name]
    ref = cls.from_config({**config, **extra})
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        ref.set_timesteps(num_steps)
        x = x * ref.init_noise_sigma
        for t in ref.timesteps:
            x = ref.step(fake_unet(ref.scale_model_input(x, t), t, 0.0), t, x,
                         generator=torch.Generator().manual_seed(1)).prev_sample
            if not torch.isfinite(x).all():
                return True
    except (IndexError, ZeroDivisionError):
        return True
    return False


@pytest.mark.parametrize("num_steps", [1, 2, T // 2, T - 2, T - 1, T])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_step_counts_work_like_diffusers_or_are_refused(name, spacing, num_steps):
    config = {**SD15_T100, "timestep_spacing": spacing}
    sampler = make_sampler(name, config)
    assert sampler.max_steps == T - SHORTFALL[name][SPACINGS.index(spacing)]
    if num_steps <= sampler.max_steps:
        run_both(name, SD15_T100, num_steps, spacing)
    else:
        with pytest.raises(ValueError, match=rf"num_steps: expected an int in 1\.\.{sampler.max_steps} .*got {num_steps}"):
            sampler.start(num_steps)
        assert diffusers_fails(name, config, num_steps), f"diffusers runs {name} at {num_steps} steps: fastdiff should too"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_max_steps_at_sd_training_length(name, spacing):
    sampler = make_sampler(name, {**SD15, "timestep_spacing": spacing})
    T_sd = SD15["num_train_timesteps"]
    assert sampler.max_steps == T_sd - SHORTFALL[name][SPACINGS.index(spacing)]
    assert len(sampler.start(sampler.max_steps).timesteps) == sampler.max_steps
    for refused in range(sampler.max_steps + 1, T_sd + 1):
        with pytest.raises(ValueError, match=rf"1\.\.{sampler.max_steps}"):
            sampler.start(refused)


@pytest.mark.parametrize("num_steps", [T * 2 // 3 + 1, T - 1, T])
def test_dpmpp_2m_trailing_to_t0_with_final_sigma_min(num_steps):
    """From T * 2/3 steps on, trailing spacing ends at t = 0 and the final sigma is sigma(0): an
    empty last step (h = 0), which diffusers takes as the identity."""
    run_both("dpmpp_2m", {**SD15_T100, "final_sigmas_type": "sigma_min"}, num_steps, "trailing")


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_trailing_counts_where_diffusers_adds_a_step_give_the_steps_asked_for(name):
    """diffusers' float arange yields 62 timesteps for 61 steps, the last t = -1; fastdiff runs the
    61 asked for (diffusers' first 61), the last of them down to sigma 0."""
    cls, extra = DIFFUSERS[name]
    ref = cls.from_config({**SD15, "timestep_spacing": "trailing", **extra})
    ref.set_timesteps(61)
    run = make_sampler(name, {**SD15, "timestep_spacing": "trailing"}).start(61)
    assert len(run.timesteps) == 61 and int(run.timesteps[-1]) >= 0
    assert run.timesteps.tolist() == ref.timesteps[:61].tolist()
    if run.sigmas is not None:
        assert run.sigmas[-1] == 0


def test_max_steps_is_one_for_the_one_step_sampler():
    assert make_sampler("x0", SD15).max_steps == 1


def test_interleaved_requests_are_independent():
    """An engine steps requests in any interleaving; each must match its solo run exactly."""
    sampler = make_sampler("dpmpp_2m", SD15)

    def solo(seed, n):
        run, g = sampler.start(n), torch.Generator().manual_seed(seed)
        x = run.initial_latents((1, 4, 8, 8), generator=g)
        for i, t in enumerate(run.timesteps):
            x = run.step(fake_unet(x, t, 0.0), i, x)
        return x

    runs = [sampler.start(n) for n in (6, 9)]
    xs = [r.initial_latents((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for r, s in zip(runs, (1, 2))]
    while not all(r.done for r in runs):
        for k, r in enumerate(runs):
            if not r.done:
                i = r.next_index
                xs[k] = r.step(fake_unet(xs[k], r.timesteps[i], 0.0), i, xs[k])
    assert torch.equal(xs[0], solo(1, 6)) and torch.equal(xs[1], solo(2, 9))


def test_per_row_generators_match_separate_requests():
    """A list of generators (one per batch row) gives each row the noise it would get alone."""
    sampler = make_sampler("euler_ancestral", SD15)

    def trajectory(batch_x, generators):
        run = sampler.start(5)
        for i, t in enumerate(run.timesteps):
            batch_x = run.step(fake_unet(run.scale_model_input(batch_x, i), t, 0.0), i, batch_x, generator=generators)
        return batch_x

    x = torch.randn(2, 4, 8, 8)
    both = trajectory(x, [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)])
    row0 = trajectory(x[:1], torch.Generator().manual_seed(10))
    row1 = trajectory(x[1:], torch.Generator().manual_seed(11))
    assert torch.equal(both, torch.cat([row0, row1]))


def test_injected_noise_replaces_generator():
    sampler = make_sampler("euler_ancestral", SD15)
    run_a, run_b = sampler.start(4), sampler.start(4)
    x = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = fake_unet(run_a.scale_model_input(x, 0), run_a.timesteps[0], 0.0)
    a = run_a.step(out, 0, x, noise=noise)
    b = run_b.step(out, 0, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_keeps_latent_dtype():
    run = make_sampler("euler", SD15).start(4)
    x = torch.randn(1, 4, 8, 8)
    out = run.step(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 0, x)
    assert out.dtype == torch.float32


def test_name_from_diffusers_class():
    assert make_sampler(None, {**SD15, "_class_name": "EulerAncestralDiscreteScheduler"}).name == "euler_ancestral"
    assert make_sampler("DPMSolverMultistepScheduler", SD15).name == "dpmpp_2m"
    assert set(SAMPLERS) == {"euler_ancestral", "euler", "ddim", "dpmpp_2m", "x0"}


def test_errors():
    run = make_sampler("dpmpp_2m", SD15).start(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="in order"):
        run.step(x, 1, x)
    with pytest.raises(ValueError, match="model_output"):
        run.step(torch.randn(1, 4, 8, 9), 0, x)
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("euler", SD15).start(0)
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("x0", SD15).start(4)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_sampler("euler", {**SD15, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("euler", {**SD15, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_sampler("ddim", {**SD15, "timestep_spacing": "karras"})
    with pytest.raises(ValueError, match="name"):
        make_sampler("heun", SD15)
    with pytest.raises(TypeError, match="scheduler_config"):
        make_sampler("euler", "scheduler_config.json")
