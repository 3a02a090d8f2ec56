"""Samplers: the denoising loop's update rule, configured from a diffusers scheduler_config.json.

Each reproduces one diffusers scheduler step for step (same timesteps, same sigmas, same update,
same noise draws), but is split for a batching engine that steps each request on its own:

    sampler = make_sampler("euler_ancestral", scheduler_config)   # shared, immutable
    run = sampler.start(num_steps)                                 # one per request, 1 <= num_steps <= sampler.max_steps
    x = run.initial_latents(shape, generator=g)                    # noise * init_noise_sigma
    for i, t in enumerate(run.timesteps):
        eps = unet(run.scale_model_input(x, i), t, ...)
        x = run.step(eps, i, x, generator=g)

A run holds only its schedule and, for DPM-Solver++, the previous x0 prediction, so runs of many
requests can be interleaved freely. Arithmetic is in fp32 (as in diffusers); `step` returns x's
dtype, so latents kept in fp32 stay fp32 even when the model runs in bf16.

    name               diffusers class                        notes
    euler_ancestral    EulerAncestralDiscreteScheduler        InstructPix2Pix's and MGIE's
    euler              EulerDiscreteScheduler                 no churn (s_churn = 0)
    ddim               DDIMScheduler                          eta = 0
    dpmpp_2m           DPMSolverMultistepScheduler            algorithm_type="dpmsolver++", solver_order=2, midpoint
    x0                 -                                      one model call at t = T-1, returns its x0 prediction
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.noise import randn

__all__ = ["make_sampler", "Sampler", "SamplerRun", "SAMPLERS"]

# Scheduler-config keys whose non-default values change the maths in ways not implemented here:
# refuse them rather than sample from a different distribution than diffusers would.
_UNSUPPORTED = {
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "variance_type": None,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "lambda_min_clipped": -math.inf,
}


def _betas(cfg: dict) -> torch.Tensor:
    """The training noise schedule, in fp32 as diffusers builds it (the timesteps' sigmas derive from it)."""
    T = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"scheduler_config['beta_schedule']: expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {schedule!r}")


class Sampler:
    """One update rule plus its configuration; `start` makes a per-request run."""

    name: str
    prediction_types = ("epsilon", "v_prediction")
    # diffusers' class defaults, used for keys the scheduler config leaves out
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def __init__(self, scheduler_config: dict | None = None):
        if scheduler_config is not None and not isinstance(scheduler_config, dict):
            raise TypeError(f"scheduler_config: expected a dict (scheduler_config.json), got {type(scheduler_config).__name__}")
        given = dict(scheduler_config or {})
        for key, default in _UNSUPPORTED.items():
            if given.get(key, default) != default:
                raise ValueError(f"scheduler_config[{key!r}]={given[key]!r}: not supported by fastdiff's {self.name} sampler (only {default!r})")
        # Keys of other schedulers (PNDM's skip_prk_steps, ...) are ignored, as diffusers' from_config does.
        self.config = {k: given.get(k, v) for k, v in self.defaults.items()}
        cfg = self.config
        if cfg["prediction_type"] not in self.prediction_types:
            raise ValueError(f"scheduler_config['prediction_type']: expected one of {self.prediction_types}, got {cfg['prediction_type']!r}")
        if cfg["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise ValueError(f"scheduler_config['timestep_spacing']: expected 'linspace', 'leading' or 'trailing', got {cfg['timestep_spacing']!r}")
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(cfg), dim=0)
        if self.alphas_cumprod.shape[0] != self.num_train_timesteps:
            raise ValueError(f"scheduler_config['trained_betas']: expected {self.num_train_timesteps} values, got {self.alphas_cumprod.shape[0]}")
        # sigma of the variance-exploding form x = x0 + sigma * eps, per training timestep (fp32, as diffusers)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        offset = cfg["steps_offset"]
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < self.num_train_timesteps:
            raise ValueError(f"scheduler_config['steps_offset']: expected an int in 0..{self.num_train_timesteps - 1}, got {offset!r}")
        # the first count that fails bounds the range (one step always works): closed-form checks, O(T) integer work
        self._max_steps = next((n - 1 for n in range(2, self.num_train_timesteps + 1) if not self._step_count_works(n)),
                               self.num_train_timesteps)

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    @property
    def max_steps(self) -> int:
        """The most steps `start` takes: every count in 1..max_steps works. At most
        num_train_timesteps; fewer where larger counts would repeat or overrun the training
        timesteps under this config's spacing (diffusers fails at those counts)."""
        return self._max_steps

    def start(self, num_steps: int) -> "SamplerRun":
        """The schedule of one request: timesteps, sigmas, initial noise scale, fresh history.
        num_steps: an int in 1..max_steps, else ValueError stating that range."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= self.max_steps:
            raise ValueError(f"num_steps: expected an int in 1..{self.max_steps} for the {self.name} sampler with "
                             f"{self.config['timestep_spacing']!r} timestep spacing over {self.num_train_timesteps} "
                             f"training timesteps, got {num_steps!r}")
        return SamplerRun(self, num_steps)

    # -- per-algorithm pieces, called by SamplerRun ------------------------------------------
    def _step_count_works(self, n: int) -> bool:
        """Whether n steps give a schedule this update rule can take (the default: every count)."""
        return True

    def _timesteps(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def _sigmas(self, timesteps: np.ndarray) -> np.ndarray | None:
        return None

    def _init_noise_sigma(self, run: "SamplerRun") -> float:
        return 1.0

    def _scale_model_input(self, run: "SamplerRun", x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def _step(self, run, out, i, x, draw_noise) -> torch.Tensor:
        raise NotImplementedError

    def _spaced(self, n: int) -> np.ndarray:
        """diffusers' timestep_spacing rule (float64 before each class casts/rounds)."""
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, T - 1, n)[::-1].copy()
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].copy() + self.config["steps_offset"]
        # diffusers' np.arange(T, 0, -T / n) holds the same values, plus a spurious t = -1 for 62 of
        # the 1000 counts (e.g. 61) where rounding leaves T - n * (T / n) a hair above 0
        return (T - np.arange(n) * (T / n)).round() - 1


class SamplerRun:
    """One request's pass through the schedule. Steps must be taken in order 0, 1, ..., n-1."""

    def __init__(self, sampler: Sampler, num_steps: int):
        self.sampler = sampler
        self.num_steps = num_steps
        steps = sampler._timesteps(num_steps)
        self.timesteps = torch.from_numpy(steps)
        self.sigmas = sampler._sigmas(steps)  # (n + 1,) fp32 numpy for sigma-space samplers, else None
        self.init_noise_sigma = sampler._init_noise_sigma(self)
        self.next_index = 0
        self.previous_x0 = None  # DPM-Solver++'s history

    def __repr__(self):
        return f"SamplerRun({self.sampler.name}, steps={self.num_steps}, next={self.next_index})"

    def initial_latents(self, shape, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Pipeline start: standard noise (drawn as diffusers' pipelines do) times init_noise_sigma."""
        return randn(shape, generator, device, dtype) * self.init_noise_sigma

    def _check_index(self, i):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_steps:
            raise ValueError(f"i: expected a step index in 0..{self.num_steps - 1}, got {i!r}")

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's input at step i (Euler samplers divide by sqrt(sigma² + 1))."""
        self._check_index(i)
        return self.sampler._scale_model_input(self, x, i)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, *, generator=None, noise=None) -> torch.Tensor:
        """Latents after step i from the model's output at timesteps[i].

        generator: torch.Generator (or one per batch row) for ancestral noise; noise: a tensor
        of x's shape to use instead of drawing. Returns x's dtype.
        """
        self._check_index(i)
        if i != self.next_index:
            raise ValueError(f"i: steps must be taken in order; expected step {self.next_index}, got {i}")
        if not isinstance(model_output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError("model_output, x: expected torch.Tensors")
        if model_output.shape != x.shape:
            raise ValueError(f"model_output: expected x's shape {tuple(x.shape)}, got {tuple(model_output.shape)}")
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise: expected x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        def draw_noise():  # ancestral noise: given, or drawn like diffusers (model_output's dtype)
            return noise if noise is not None else randn(x.shape, generator, x.device, model_output.dtype)

        out = self.sampler._step(self, model_output.float(), i, x.float(), draw_noise)
        self.next_index += 1
        return out.to(x.dtype)

    @property
    def done(self) -> bool:
        return self.next_index == self.num_steps


class _SigmaSampler(Sampler):
    """Euler family: works on x = x0 + sigma * eps, whose scale grows with sigma (k-diffusion form)."""

    def _timesteps(self, n):
        return self._spaced(n).astype(np.float32)  # fractional timesteps for linspace spacing

    def _sigmas(self, timesteps):
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def _init_noise_sigma(self, run):
        top = float(run.sigmas.max())
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def _scale_model_input(self, run, x, i):
        return x / (float(run.sigmas[i]) ** 2 + 1) ** 0.5

    def _x0(self, out, x, sigma):
        if self.config["prediction_type"] == "epsilon":
            return x - sigma * out
        # v-prediction is defined on the unit-variance input x / sqrt(sigma² + 1)
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


class EulerAncestral(_SigmaSampler):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (sigma_down² + sigma_up² = sigma_next²)."""

    name = "euler_ancestral"

    def _step(self, run, out, i, x, draw_noise):
        sigma, sigma_next = float(run.sigmas[i]), float(run.sigmas[i + 1])
        x0 = self._x0(out, x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if i == run.num_steps - 1:  # sigma_next = 0: diffusers draws noise here too, scales it by 0, draws no more
            return x
        # a repeated sigma (leading spacing past T - 1) has sigma_up = 0, but diffusers draws all the same
        return x + draw_noise().to(x) * sigma_up


class Euler(_SigmaSampler):
    """Deterministic Euler step of the probability-flow ODE in sigma."""

    name = "euler"

    def _step(self, run, out, i, x, draw_noise):
        sigma, sigma_next = float(run.sigmas[i]), float(run.sigmas[i + 1])
        x0 = self._x0(out, x, sigma)
        return x + (x - x0) / sigma * (sigma_next - sigma)


class DDIM(Sampler):
    """Deterministic DDIM (eta = 0): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""

    name = "ddim"
    defaults = {
        **Sampler.defaults,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
    }

    def _timesteps(self, n):
        spaced = self._spaced(n)
        return (spaced.round() if self.config["timestep_spacing"] == "linspace" else spaced).astype(np.int64)

    def _step_count_works(self, n):
        # leading spacing plus steps_offset can put the top timestep past the schedule (diffusers: IndexError)
        if self.config["timestep_spacing"] != "leading":
            return True
        return (n - 1) * (self.num_train_timesteps // n) + self.config["steps_offset"] < self.num_train_timesteps

    def _alpha(self, t):
        if t >= 0:
            return float(self.alphas_cumprod[t])
        return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _x0_eps(self, out, x, t):
        a = self._alpha(t)
        if self.config["prediction_type"] == "epsilon":
            x0, eps = (x - (1 - a) ** 0.5 * out) / a**0.5, out
        else:
            x0, eps = a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
        if self.config["clip_sample"]:
            x0 = x0.clamp(-self.config["clip_sample_range"], self.config["clip_sample_range"])
        return x0, eps

    def _step(self, run, out, i, x, draw_noise):
        t = int(run.timesteps[i])
        # diffusers steps back by T // n whatever the spacing (so linspace spacing lands off-grid)
        a_prev = self._alpha(t - self.num_train_timesteps // run.num_steps)
        x0, eps = self._x0_eps(out, x, t)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class DPMSolverPP2M(Sampler):
    """DPM-Solver++ (2M): exponential integrator on x0 predictions in log-SNR lambda, second order
    from the previous step's x0; first order at the first step and (lower_order_final) the last."""

    name = "dpmpp_2m"
    prediction_types = ("epsilon", "v_prediction", "sample")
    defaults = {
        **Sampler.defaults,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
    }

    def __init__(self, scheduler_config=None):
        super().__init__(scheduler_config)
        for key, value in (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("solver_type", "midpoint")):
            if self.config[key] != value:
                raise ValueError(f"scheduler_config[{key!r}]: the dpmpp_2m sampler implements {value!r}, got {self.config[key]!r}")
        if self.config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"scheduler_config['final_sigmas_type']: expected 'zero' or 'sigma_min', got {self.config['final_sigmas_type']!r}")

    def _timesteps(self, n):
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if spacing == "linspace":  # n + 1 points, the final t = 0 dropped
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = T // (n + 1)
            return ((np.arange(0, n + 1) * ratio).round()[::-1][:-1] + self.config["steps_offset"]).astype(np.int64)
        return self._spaced(n).astype(np.int64)

    def _step_count_works(self, n):
        """The second-order update divides by the log-SNR step between the previous and the current
        timestep: counts that give two timesteps one sigma (diffusers: NaN latents) do not work."""
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if spacing == "linspace":  # n + 1 points over T - 1 unit steps repeat from n = T on
            return n < T
        if spacing == "leading":  # spaced T // (n + 1) apart; the top two clamp together at T - 1 past it
            ratio = T // (n + 1)
            return ratio >= 1 and (n - 1) * ratio + self.config["steps_offset"] < T - 1
        return True  # trailing: at least one timestep apart, all in 0..T-1

    def _sigmas(self, timesteps):
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        last = 0.0 if self.config["final_sigmas_type"] == "zero" else float(self.train_sigmas[0])
        return np.concatenate([sigmas, [last]]).astype(np.float32)

    @staticmethod
    def _alpha_sigma_lambda(sigma):
        """(alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) of the variance-preserving form."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        std = sigma * alpha
        return alpha, std, (math.log(alpha) - math.log(std)) if std > 0 else math.inf

    def _step(self, run, out, i, x, draw_noise):
        alpha_s, std_s, lambda_s = self._alpha_sigma_lambda(float(run.sigmas[i]))
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            x0 = (x - std_s * out) / alpha_s
        elif prediction == "v_prediction":
            x0 = alpha_s * x - std_s * out
        else:
            x0 = out
        previous_x0, run.previous_x0 = run.previous_x0, x0

        alpha_t, std_t, lambda_t = self._alpha_sigma_lambda(float(run.sigmas[i + 1]))
        if std_t == 0:  # final sigma 0: the solution is the x0 prediction itself
            return x0
        last = i == run.num_steps - 1
        first_order = previous_x0 is None or (
            last and (self.config["euler_at_final"] or (self.config["lower_order_final"] and run.num_steps < 15))
        )
        h = lambda_t - lambda_s
        phi = alpha_t * math.expm1(-h)  # alpha_t (e^{-h} - 1)
        x = (std_t / std_s) * x - phi * x0
        # h = 0 (trailing spacing ending at t = 0, then final sigma_min = sigma(0)): an empty
        # interval, x unchanged; diffusers' correction term is 0 there too (1 / inf)
        if not first_order and h != 0:
            _, _, lambda_prev = self._alpha_sigma_lambda(float(run.sigmas[i - 1]))
            r = (lambda_s - lambda_prev) / h
            x = x - 0.5 * phi * (x0 - previous_x0) / r
        return x


class OneStepX0(Sampler):
    """MobileDiffusion's distilled one-step mode: the model sees pure noise at t = T-1 and its
    prediction converted to x0 is the result."""

    name = "x0"
    prediction_types = ("epsilon", "v_prediction", "sample")
    defaults = {**Sampler.defaults, "clip_sample": False, "clip_sample_range": 1.0}

    def _step_count_works(self, n):
        return n == 1

    def start(self, num_steps: int = 1) -> SamplerRun:
        if num_steps != 1:
            raise ValueError(f"num_steps: the one-step x0 sampler takes exactly 1 step, got {num_steps!r}")
        return super().start(1)

    def _timesteps(self, n):
        return np.array([self.num_train_timesteps - 1], dtype=np.int64)

    def _step(self, run, out, i, x, draw_noise):
        a = float(self.alphas_cumprod[int(run.timesteps[i])])
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            x0 = (x - (1 - a) ** 0.5 * out) / a**0.5
        elif prediction == "v_prediction":
            x0 = a**0.5 * x - (1 - a) ** 0.5 * out
        else:
            x0 = out
        if self.config["clip_sample"]:
            x0 = x0.clamp(-self.config["clip_sample_range"], self.config["clip_sample_range"])
        return x0


SAMPLERS = {cls.name: cls for cls in (EulerAncestral, Euler, DDIM, DPMSolverPP2M, OneStepX0)}
_DIFFUSERS_NAMES = {
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "EulerDiscreteScheduler": "euler",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


def make_sampler(name: str | None = None, scheduler_config: dict | None = None) -> Sampler:
    """A sampler by name (see SAMPLERS, or a diffusers scheduler class name); name=None takes the
    class named by scheduler_config['_class_name']. Keys the config leaves out take the diffusers
    class defaults of that sampler (e.g. DDIM: leading spacing, clip_sample=True)."""
    if name is None:
        name = (scheduler_config or {}).get("_class_name")
        if name is None:
            raise ValueError("name: expected a sampler name when scheduler_config has no '_class_name'")
    key = _DIFFUSERS_NAMES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"name: expected one of {sorted(SAMPLERS)} or {sorted(_DIFFUSERS_NAMES)}, got {name!r}")
    return SAMPLERS[key](scheduler_config)
