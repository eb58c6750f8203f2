"""Noise schedule, LCM timestep grid and boundary conditions (DESIGN §2) as small pure functions.

The tables come from diffusers' schedulers; the formulas that the differentiable chain needs are
re-stated here as pure tensor functions so that gradients flow through them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import DDPMScheduler, LCMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@lru_cache(maxsize=None)
def _alphas_cumprod(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    sched = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
    )
    return sched.alphas_cumprod.to(torch.float64)


def alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """abar_t for t = 0..T-1 in float64 (LCM's default is scaled_linear 0.00085..0.012)."""
    return _alphas_cumprod(beta_schedule, beta_start, beta_end, num_train_timesteps).clone()


@lru_cache(maxsize=None)
def _lcm_timesteps(num_steps: int, num_train_timesteps: int, original_inference_steps: int) -> tuple[int, ...]:
    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_inference_steps)
    sched.set_timesteps(num_steps)
    return tuple(int(t) for t in sched.timesteps)


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50) -> list[int]:
    """LCM's skipping grid, in sampling order: K=4 -> [999, 759, 519, 279]."""
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_steps}")
    if num_steps > original_inference_steps:
        raise ValueError(f"at most {original_inference_steps} sampling steps on the LCM grid, got {num_steps}")
    return list(_lcm_timesteps(num_steps, num_train_timesteps, original_inference_steps))


def boundary_scalings(
    timestep: torch.Tensor | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t): c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    t = torch.as_tensor(timestep, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_x0(x: torch.Tensor, model_output: torch.Tensor, abar_t: torch.Tensor | float, prediction_type: str) -> torch.Tensor:
    """The clean sample implied by the network's output at noise level abar_t."""
    abar_t = torch.as_tensor(abar_t, dtype=x.dtype, device=x.device)
    if prediction_type == "epsilon":
        return (x - (1 - abar_t).sqrt() * model_output) / abar_t.sqrt()
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * x - (1 - abar_t).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def consistency_function(
    x: torch.Tensor,
    model_output: torch.Tensor,
    timestep: int,
    abar_t: torch.Tensor | float,
    prediction_type: str,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_pred (LCM parameterisation)."""
    c_skip, c_out = boundary_scalings(timestep, sigma_data, timestep_scaling)
    x0 = predicted_x0(x, model_output, abar_t, prediction_type)
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, abar_t broadcast per sample."""
    abar_t = abar_t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction regression target sqrt(abar) noise - sqrt(1 - abar) x0."""
    abar_t = abar_t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x0
