"""TCD (Trajectory Consistency Distillation) as a chain family: diffusers' TCDScheduler step as the
per-step Gaussian policy the divergences need (DESIGN §2 "Other chain families").

TCDScheduler.step at t (next grid timestep t', gamma = the pipeline's eta):
    x0, eps from the network output (its prediction type);   s = floor((1 - gamma) t')
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps                        (deterministic jump)
    x_t' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z   (re-noise; not on the last step)
and the last step outputs x_s with t' = 0, i.e. s = 0: sqrt(abar_0) x0 + sqrt(1 - abar_0) eps (not x0).

The chain (chain.run_chain) takes the network's m_k as its output on the last step, so `denoise` returns
exactly that final jump m = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps; together with
x = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps it determines (x0, eps) again, which `step` solves for (a 2x2
system per coordinate, well conditioned for t > 0). gamma = 1 re-noises from s = 0: the consistency
chain's noise level. gamma = 0 is deterministic (sigma 0): the chain then regularises that step with
the floor sigma^2 = 1 - abar_t' (`sigma_floor`: the noise level the next state carries, the sigma the
same step has at gamma = 1), as the final step is treated under final_step: floor.
"""

from __future__ import annotations

import contextlib
import math

import torch


class TCDTransition:
    def __init__(self, gamma: float = 0.3):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    @property
    def deterministic(self) -> bool:
        """gamma = 0: no step adds noise, so the chain has no step log-probabilities (methods/base.check_chain)."""
        return self.gamma == 0

    def __str__(self) -> str:
        return f"TCD with tcd_gamma {self.gamma:g}"

    @staticmethod
    def _x0_eps(x, out, a_t: float, prediction_type: str):
        """As TCDScheduler.step: pred_original_sample and pred_epsilon."""
        if prediction_type == "epsilon":
            return (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
        if prediction_type == "sample":
            return out, (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t)
        if prediction_type == "v_prediction":
            return math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out, math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
        raise ValueError(f"TCD does not support prediction type {prediction_type!r}")

    def denoise(self, world, x, t, cond, reference):
        with world.reference_policy() if reference else contextlib.nullcontext():
            out = world.model_output(x, t, cond).to(x.dtype)
        abar = world.alphas_cumprod
        x0, eps = self._x0_eps(x, out, float(abar[t]), world.prediction_type)
        a_0 = float(abar[0])
        return math.sqrt(a_0) * x0 + math.sqrt(1 - a_0) * eps  # the last step's output (s = 0)

    def s_of(self, t_next: int) -> int:
        # in torch float32, exactly as the scheduler computes it (floor of a float32 product)
        return int(torch.floor((1 - self.gamma) * torch.tensor(t_next)).to(torch.long))

    def step(self, x, m, t, t_next, abar):
        a_t, a_0 = float(abar[t]), float(abar[0])
        # solve x = a x0 + b eps, m = c x0 + d eps for (x0, eps)
        a, b, c, d = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_0), math.sqrt(1 - a_0)
        det = a * d - b * c
        x0, eps = (d * x - b * m) / det, (a * m - c * x) / det
        a_s = float(abar[self.s_of(t_next)])
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        ratio = float(abar[t_next]) / a_s
        return math.sqrt(ratio) * x_s, math.sqrt(max(1 - ratio, 0.0))

    def sigma_floor(self, t, t_next, abar) -> float:
        """sigma of a deterministic step for the divergences (sampling adds no noise)."""
        return float((1 - abar[t_next]).sqrt())

    def timesteps(self, world, num_steps):
        from diffusers import TCDScheduler

        scheduler = TCDScheduler.from_config(world.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return [int(t) for t in scheduler.timesteps]


def chain_transition(lcm):
    """The per-step update an lcm section asks for, without weights: TCD with its gamma, a distilled sampler's
    ChainSpec (distilled.py: its name and `deterministic`), or None (the consistency chain)."""
    if lcm.scheduler in ("euler", "euler_ancestral", "ddim_trailing", "scm"):
        from cmalign.worlds.lcm.distilled import ChainSpec

        return ChainSpec(lcm.scheduler)
    return TCDTransition(lcm.tcd_gamma) if lcm.scheduler == "tcd" else None
