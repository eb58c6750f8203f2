"""The distilled samplers (SD-Turbo, SDXL-Turbo, SDXL-Lightning, Hyper-SD, SANA-Sprint) as chain transitions
(DESIGN §2 "Distilled samplers" and "Other chain families"): each stock scheduler's `step()` written as
x_{k+1} = a_k x0_pred(x_k) + b_k eps_pred(x_k) + c_k z_k with z_k the chain's fixed noise.

Every class has the `chain.Transition` protocol (`denoise`, `step`, `timesteps`) plus
`deterministic` (c_k = 0: no log-probability, so policy-gradient methods refuse it), `sigma_floor`
(the sigma a deterministic step is regularised with), `final_sigma` (the final-step floor) and
`initial_state` (the chain's x_1 from its N(0, I) draw). The timestep grid and the noise tables are the
scheduler object's own (`set_timesteps`), never re-derived: float32 values, used in the chain's dtype.

**The chain's state.** For the Euler schedulers the chain's x is the *scaled model input*,
x = scale_model_input(x_sigma) = x_sigma / sqrt(1 + sigma^2), x_sigma the scheduler's sample; it is
variance preserving with abar = 1 / (1 + sigma^2) (sigma = sqrt((1 - abar_t) / abar_t) from the
scheduler's float32 table), and it is exactly what the UNet is called with. DDIM's sample already is
VP (init_noise_sigma 1, scale_model_input the identity). SANA-Sprint's is the pipeline's latents over
sigma_data: x = latents / sigma_data = cos(t) x0 + sin(t) z with x0 the pipeline's output latents.

EulerTransition (EulerDiscreteScheduler, s_churn = 0; SD-Turbo, SDXL-Lightning), sigma s = sigma(t_k),
s' = sigma(t_{k+1}):
    x0 = x_sigma - s out (epsilon) | -s / sqrt(1 + s^2) out + x_sigma / (1 + s^2) (v) | out (sample)
    eps = (x_sigma - x0) / s            (the scheduler's "derivative")
    x'_sigma = x_sigma + (s' - s) eps = x0 + s' eps
    x_{k+1} = sqrt(abar') x0 + sqrt(1 - abar') eps,   abar' = 1 / (1 + s'^2)
  i.e. a_k = sqrt(abar'), b_k = sqrt(1 - abar'), c_k = 0: deterministic (DDIM eta 0 in sigma form).
  sigma_floor = sqrt(1 - abar') = s' / sqrt(1 + s'^2), the noise level of the state it produces.
  The last step goes to s' = 0 and outputs x0: the chain's m_K.

EulerAncestralTransition (EulerAncestralDiscreteScheduler; SDXL-Turbo's shipped scheduler):
    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2),  sigma_down = sqrt(s'^2 - sigma_up^2)
    x'_sigma = x0 + sigma_down eps + sigma_up z
    x_{k+1} ~ N(a_k x0 + b_k eps, c_k^2 I):  a_k = 1 / sqrt(1 + s'^2), b_k = sigma_down / sqrt(1 + s'^2),
                                            c_k = sigma_up / sqrt(1 + s'^2)
  z is the noise step() draws (one per step, in sampling order after the initial latent; the last
  step's draw is multiplied by 0). Epsilon and v prediction (the scheduler has no "sample").

DDIMTrailingTransition (DDIMScheduler, eta = 0, any timestep_spacing, "trailing" by default; Hyper-SD
multi-step): with abar_t, abar_p for p = t - T // K (the scheduler's own prev_timestep; the final
alpha when p < 0: abar_0, or 1 under set_alpha_to_one),
    x0, eps from the output (epsilon / v / sample as DDIMScheduler.step)
    x_{k+1} = sqrt(abar_p) x0 + sqrt(1 - abar_p) eps              (c_k = 0; sigma_floor = sqrt(1 - abar_p))
  The last step outputs sqrt(abar_final) x0 + sqrt(1 - abar_final) eps (not x0 unless set_alpha_to_one),
  so, as TCD, `denoise` returns that final jump m and `step` solves (x, m) back for (x0, eps).
  p = t - T // K is the next grid timestep whenever K divides T (K = 1, 2, 4, 8 for T = 1000); otherwise the
  model is called at the next grid timestep on a state at level p, as the stock sampler does.

SCMTransition (SCMScheduler, TrigFlow; SANA-Sprint), on x = latents / sigma_data, with
u = sin t / (cos t + sin t) (the transformer's timestep) and r = sqrt(u^2 + (1 - u)^2):
    F = transformer(x r, u)                                   (guidance embedded, no CFG)
    v = ((1 - 2u) x r + (1 - 2u + 2u^2) F) / r                 (the pipeline's trigflow output / sigma_data)
    m = x0 = cos(t) x - sin(t) v                              (= denoised / sigma_data: the output latents)
    x_{k+1} ~ N(cos(t_{k+1}) m, sin(t_{k+1})^2 I)              (a_k = cos t_{k+1}, b_k = 0, c_k = sin t_{k+1})
  In the pipeline's own units (latents = sigma_data x) the std is sigma_data sin(t_{k+1}), as DESIGN writes
  it; the chain's units make x_1 = z exactly. final_sigma = sin(t_K) (the last input's noise level).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, SCMScheduler

from cmalign.errors import UserError

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _config(scheduler_or_config) -> dict:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    return dict(config)


def _network(world, x, t, cond, reference):
    with world.reference_policy() if reference else contextlib.nullcontext():
        return world.model_output(x, t, cond).to(x.dtype)


class _Scheduled:
    """A transition on a stock scheduler built from a config with overrides; `_fresh(K)` is a scheduler
    after set_timesteps(K) (cached per K)."""

    scheduler_cls: type = None
    deterministic: bool = False

    def __init__(self, scheduler_or_config, **overrides):
        overrides = {k: v for k, v in overrides.items() if v is not None}
        self.config = {**_config(scheduler_or_config), **overrides}
        self.scheduler = self.scheduler_cls.from_config(self.config)
        self._schedulers: dict[int, object] = {}

    def _fresh(self, num_steps: int):
        if num_steps not in self._schedulers:
            self._schedulers[num_steps] = self._set_timesteps(num_steps)
        return self._schedulers[num_steps]

    def _set_timesteps(self, num_steps: int):
        if num_steps < 1:
            raise ValueError(f"the number of sampling steps must be >= 1, got {num_steps}")
        scheduler = self.scheduler_cls.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def __str__(self) -> str:
        spacing = self.config.get("timestep_spacing")
        what = f"{self.scheduler_cls.__name__}" + (f", {spacing} spacing" if spacing else "")
        return f"{type(self).__name__} ({what}{', deterministic' if self.deterministic else ''})"

    def timesteps(self, world, num_steps: int) -> list:
        ts = [float(t) for t in self._fresh(num_steps).timesteps]
        return [int(t) if t.is_integer() else t for t in ts]


class _SigmaTransition(_Scheduled):
    """The Euler schedulers' sigma parameterisation: the chain's state is the scaled model input."""

    def __init__(self, scheduler_or_config, *, timestep_spacing: str | None = "trailing",
                 prediction_type: str | None = None):
        super().__init__(scheduler_or_config, timestep_spacing=timestep_spacing, prediction_type=prediction_type)
        c = self.scheduler.config
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)]
        if c.get("interpolation_type", "linear") != "linear":
            unsupported.append(f"interpolation_type={c.interpolation_type}")
        if c.get("timestep_type", "discrete") != "discrete":
            unsupported.append(f"timestep_type={c.timestep_type}")
        if c.get("final_sigmas_type", "zero") != "zero":
            unsupported.append(f"final_sigmas_type={c.final_sigmas_type}")  # the chain's last step outputs x0
        if unsupported:
            raise ValueError(f"{type(self).__name__} does not support {', '.join(unsupported)}")
        if self.prediction_type not in self.supported_predictions:
            raise ValueError(f"{type(self).__name__} does not support prediction type {self.prediction_type!r}")
        # sigma of every integer timestep, from the scheduler itself (its full "trailing" grid is 999..0)
        full = self.scheduler_cls.from_config(self.scheduler.config, timestep_spacing="trailing")
        full.set_timesteps(full.config.num_train_timesteps)
        self._sigma = {float(t): float(s) for t, s in zip(full.timesteps, full.sigmas)}

    supported_predictions = PREDICTIONS

    def _set_timesteps(self, num_steps):
        scheduler = super()._set_timesteps(num_steps)
        self._sigma.update({float(t): float(s) for t, s in zip(scheduler.timesteps, scheduler.sigmas)})
        return scheduler

    def sigma(self, t) -> float:
        """The scheduler's sigma at timestep t (its float32 value)."""
        try:
            return self._sigma[float(t)]
        except KeyError:
            raise ValueError(f"timestep {t} is not on any grid of this {type(self).__name__}") from None

    def initial_state(self, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """x_1 from the chain's N(0, I) draw: the pipeline's latents = noise * init_noise_sigma, scaled as the
        model's input (for trailing spacing: noise * sqrt(1 - abar_{t_1}))."""
        scheduler = self._fresh(num_steps)
        s1 = float(scheduler.sigmas[0])
        return noise * (float(scheduler.init_noise_sigma) / math.sqrt(1 + s1 * s1))

    def x0(self, x: torch.Tensor, out: torch.Tensor, t) -> torch.Tensor:
        """The scheduler's pred_original_sample, from the scaled input x and the network's output."""
        s = self.sigma(t)
        x_sigma = x * math.sqrt(1 + s * s)
        if self.prediction_type == "epsilon":
            return x_sigma - s * out
        if self.prediction_type == "v_prediction":
            return out * (-s / math.sqrt(s * s + 1)) + x_sigma / (s * s + 1)
        return out  # sample

    def denoise(self, world, x, t, cond, reference):
        return self.x0(x, _network(world, x, t, cond, reference), t)

    def final_sigma(self, t, abar=None) -> float:
        """The final-step floor: the noise level of the last input, sqrt(1 - abar_t) = s / sqrt(1 + s^2)."""
        s = self.sigma(t)
        return s / math.sqrt(1 + s * s)


class EulerTransition(_SigmaTransition):
    """EulerDiscreteScheduler.step (s_churn 0): deterministic; SD-Turbo, SDXL-Lightning ("sample" for its
    1-step model). `step` returns (mean, 0.0)."""

    scheduler_cls = EulerDiscreteScheduler
    deterministic = True

    def step(self, x, m, t, t_next, abar=None):
        s, s_next = self.sigma(t), self.sigma(t_next)
        x_sigma = x * math.sqrt(1 + s * s)
        eps = (x_sigma - m) / s
        return (x_sigma + eps * (s_next - s)) / math.sqrt(1 + s_next * s_next), 0.0

    def sigma_floor(self, t, t_next, abar=None) -> float:
        """sigma of the deterministic step for the divergences: the noise level of the state it produces."""
        return self.final_sigma(t_next)


class EulerAncestralTransition(_SigmaTransition):
    """EulerAncestralDiscreteScheduler.step: Gaussian N(mean, sigma^2 I) in the chain's (scaled) units;
    SDXL-Turbo's shipped scheduler."""

    scheduler_cls = EulerAncestralDiscreteScheduler
    supported_predictions = ("epsilon", "v_prediction")

    @staticmethod
    def sigmas_up_down(s: float, s_next: float) -> tuple[float, float]:
        up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        return up, math.sqrt(s_next**2 - up**2)

    def step(self, x, m, t, t_next, abar=None):
        s, s_next = self.sigma(t), self.sigma(t_next)
        up, down = self.sigmas_up_down(s, s_next)
        x_sigma = x * math.sqrt(1 + s * s)
        eps = (x_sigma - m) / s
        scale = 1 / math.sqrt(1 + s_next * s_next)
        return (x_sigma + eps * (down - s)) * scale, up * scale


class DDIMTrailingTransition(_Scheduled):
    """DDIMScheduler.step with eta 0 (Hyper-SD multi-step): deterministic. `denoise` returns the last step's
    output sqrt(abar_final) x0 + sqrt(1 - abar_final) eps (TCD's convention); `step` recovers (x0, eps)."""

    scheduler_cls = DDIMScheduler
    deterministic = True

    def __init__(self, scheduler_or_config, *, timestep_spacing: str | None = "trailing",
                 prediction_type: str | None = None):
        super().__init__(scheduler_or_config, timestep_spacing=timestep_spacing, prediction_type=prediction_type)
        c = self.scheduler.config
        if c.get("thresholding") or c.get("clip_sample"):
            raise ValueError("DDIMTrailingTransition: the scheduler clips or thresholds x0, which the chain does "
                             "not do; set clip_sample and thresholding to false")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"DDIMTrailingTransition does not support prediction type {self.prediction_type!r}")
        self.abar = self.scheduler.alphas_cumprod.to(torch.float64)  # the scheduler's float32 table
        self.abar_final = float(self.scheduler.final_alpha_cumprod)
        self.num_train_timesteps = c.num_train_timesteps
        self._prev: dict[tuple[int, int], int] = {}

    def _set_timesteps(self, num_steps):
        scheduler = super()._set_timesteps(num_steps)
        ts = [int(t) for t in scheduler.timesteps]
        stride = self.num_train_timesteps // num_steps
        self._prev.update({(t, t_next): t - stride for t, t_next in zip(ts, ts[1:])})
        return scheduler

    def prev_timestep(self, t, t_next) -> int:
        """The scheduler's prev_timestep t - T // K for the grid step t -> t_next (t_next when the pair was not
        produced by `timesteps`; the same whenever K divides T)."""
        return self._prev.get((int(t), int(t_next)), int(t_next))

    def _abar(self, t) -> float:
        return float(self.abar[int(t)]) if int(t) >= 0 else self.abar_final

    def x0_eps(self, x, out, t):
        """DDIMScheduler.step's pred_original_sample and pred_epsilon."""
        a_t = self._abar(t)
        if self.prediction_type == "epsilon":
            return (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
        if self.prediction_type == "sample":
            return out, (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t)
        return math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out, math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x

    def denoise(self, world, x, t, cond, reference):
        x0, eps = self.x0_eps(x, _network(world, x, t, cond, reference), t)
        a = self.abar_final
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps

    def step(self, x, m, t, t_next, abar=None):
        a_t, a_f = self._abar(t), self.abar_final
        # solve x = a x0 + b eps, m = c x0 + d eps
        a, b, c, d = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_f), math.sqrt(1 - a_f)
        det = a * d - b * c
        x0, eps = (d * x - b * m) / det, (a * m - c * x) / det
        a_p = self._abar(self.prev_timestep(t, t_next))
        return math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps, 0.0

    def sigma_floor(self, t, t_next, abar=None) -> float:
        return math.sqrt(1 - self._abar(self.prev_timestep(t, t_next)))

    def final_sigma(self, t, abar=None) -> float:
        return math.sqrt(1 - self._abar(t))

    def initial_state(self, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        return noise * float(self._fresh(num_steps).init_noise_sigma)  # 1.0


class SCMTransition(_Scheduled):
    """SCMScheduler.step (TrigFlow) with SanaSprintPipeline's input/output scalings; timesteps are the
    scheduler's continuous t (floats), max_timesteps / intermediate_timesteps as the pipeline passes them
    (the intermediate one only at K = 2)."""

    scheduler_cls = SCMScheduler

    def __init__(self, scheduler_or_config=None, *, max_timesteps: float = 1.57080,
                 intermediate_timesteps: float | None = 1.3):
        super().__init__({} if scheduler_or_config is None else scheduler_or_config)
        if self.prediction_type != "trigflow":
            raise ValueError(f"SCMTransition supports the trigflow parameterisation, not {self.prediction_type!r}")
        self.sigma_data = float(self.scheduler.config.sigma_data)
        self.max_timesteps, self.intermediate_timesteps = max_timesteps, intermediate_timesteps

    def _set_timesteps(self, num_steps):
        scheduler = self.scheduler_cls.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps, max_timesteps=self.max_timesteps,
                                intermediate_timesteps=self.intermediate_timesteps if num_steps == 2 else None)
        return scheduler

    def timesteps(self, world, num_steps: int) -> list[float]:
        return [float(t) for t in self._fresh(num_steps).timesteps[:-1]]  # the loop's t (the last entry is 0)

    @staticmethod
    def transformer_timestep(t: float) -> float:
        """u = sin t / (cos t + sin t): what the transformer is called with."""
        return math.sin(t) / (math.cos(t) + math.sin(t))

    def model_input(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
        u = self.transformer_timestep(t)
        return x * math.sqrt(u * u + (1 - u) ** 2), u

    def x0(self, x: torch.Tensor, out: torch.Tensor, t: float) -> torch.Tensor:
        """The pipeline's denoised / sigma_data from the chain's x and the transformer's output."""
        u = self.transformer_timestep(t)
        r = math.sqrt(u * u + (1 - u) ** 2)
        v = ((1 - 2 * u) * (x * r) + (1 - 2 * u + 2 * u * u) * out) / r
        return math.cos(t) * x - math.sin(t) * v

    def denoise(self, world, x, t, cond, reference):
        inp, u = self.model_input(x, t)
        return self.x0(x, _network(world, inp, u, cond, reference), t)

    def step(self, x, m, t, t_next, abar=None):
        return math.cos(t_next) * m, math.sin(t_next)

    def final_sigma(self, t, abar=None) -> float:
        return math.sin(t)

    def initial_state(self, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        return noise  # latents = noise * sigma_data, x = latents / sigma_data


TRANSITIONS = {"euler": EulerTransition, "euler_ancestral": EulerAncestralTransition,
               "ddim_trailing": DDIMTrailingTransition, "scm": SCMTransition}


@dataclass(frozen=True)
class ChainSpec:
    """What a method check needs to know of a distilled chain before any model is read (factory.chain_transition):
    its name and whether a step adds noise."""

    chain: str

    @property
    def deterministic(self) -> bool:
        return TRANSITIONS[self.chain].deterministic

    def __str__(self) -> str:
        cls = TRANSITIONS[self.chain]
        return f"{cls.__name__} ({cls.scheduler_cls.__name__}{', deterministic' if cls.deterministic else ''})"


def build_transition(chain: str, scheduler_config):
    """The transition of a distilled chain (a TRANSITIONS key) on a pipeline's scheduler config; a config it
    cannot reproduce is refused in one line (UserError)."""
    try:
        return TRANSITIONS[chain](scheduler_config)
    except ValueError as exc:
        raise UserError(f"lcm.scheduler {chain}: {exc}") from None
