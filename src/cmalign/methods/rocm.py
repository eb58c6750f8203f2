"""ROCM: back-propagate a differentiable reward through the whole fixed-noise chain, with a per-step
f-divergence to the reference (the same network with its adapter disabled):

    L = - reward_scale * mean_b r(x0_b, c_b) + beta * mean_b sum_k D_k

Reward components that are not differentiable enter through the score-function estimator of
methods/hybrid.py (hybrid ROCM); the differentiable ones and the divergence stay reparameterised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.divergences import plan_from_config
from cmalign.methods.base import Batch, Method
from cmalign.methods.hybrid import hybrid_objective


def clamp_images(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Clamp to [0, 1] for the reward. The value is always in range; the modes differ in gradient:
    hard zeroes it on saturated pixels, straight_through passes it unchanged, soft is a smooth
    clamp (softplus edges, sharpness 20) whose gradient fades near and beyond the bounds."""
    if mode == "hard":
        return images.clamp(0, 1)
    if mode == "straight_through":
        return images + (images.clamp(0, 1) - images).detach()
    if mode == "soft":
        k = 20.0
        return ((F.softplus(k * images) - F.softplus(k * (images - 1))) / k).clamp(0, 1)
    raise ValueError(f"unknown clamp mode {mode!r}")


class Rocm(Method):
    name = "rocm"
    per_step_divergence = True
    needs_differentiable_reward = False  # non-differentiable terms: the hybrid estimator (methods/hybrid.py)
    score_function_rewards = True

    def __init__(self, cfg, world, reward):
        super().__init__(cfg, world, reward)
        self.timesteps = world.timesteps(cfg.num_steps)
        self.grad_checkpointing = (
            world.grad_checkpointing_default if cfg.grad_checkpointing is None else cfg.grad_checkpointing
        )
        self.hybrid = hybrid_objective(cfg, reward, self.timesteps, self.grad_checkpointing)  # None: all differentiable

    def divergence_kwargs(self, generator: torch.Generator | None = None) -> dict:
        cfg = self.cfg
        if cfg.divergence != "js":
            return {}
        return {"estimator": cfg.js_estimator, "num_samples": cfg.js_samples, "generator": generator}

    def step(self, batch: Batch, optimizer_step):
        """One training step: a fresh fixed-noise rollout, the objective, one update."""
        loss, metrics, images = self.loss(batch.prompts, batch.noise(self.world, self.cfg.num_steps), batch.generator,
                                          shard=batch.shard)
        metrics["grad_norm"] = optimizer_step(loss)
        return metrics, images

    def loss(self, prompts: list[str], noise: ChainNoise, generator: torch.Generator | None = None, shard=None):
        """One objective evaluation: (loss, metrics dict of floats, decoded images in [0, 1])."""
        cfg = self.cfg
        with_ref = cfg.beta > 0
        # the steps/chains that pay for a reference call (divergence_steps / _fraction; all by default)
        plan = plan_from_config(cfg, len(self.timesteps), len(prompts), generator, shard) if with_ref else None
        cond = self.world.encode_prompts(prompts)
        traj = run_chain(
            self.world, cond, noise, self.timesteps,
            with_reference=with_ref, divergence_grad=cfg.divergence_grad,
            backprop_steps=cfg.backprop_steps, grad_checkpointing=self.grad_checkpointing,
            reference_rows=plan.reference_rows(len(self.timesteps)) if plan is not None else None,
        )
        images = self.world.decode(traj.x0)
        clamped = clamp_images(images.to(torch.promote_types(images.dtype, torch.float32)), cfg.clamp)
        if self.hybrid is None:
            reward = self.reward(clamped, prompts)
            objective, metrics = reward.mean(), {}
        else:
            reward, objective, metrics = self.hybrid(self.world, traj, cond, clamped, prompts)
        loss = -cfg.reward_scale * objective
        metrics = {"reward": reward.mean().item(), **metrics}
        if with_ref:
            per_step = step_divergences(
                traj, cfg.divergence, cfg.divergence_reduction, cfg.final_step, plan=plan, **self.divergence_kwargs(generator)
            )
            total = per_step.sum(1).mean()  # unbiased for the full sum under a subsampling plan
            loss = loss + cfg.beta * total
            metrics["divergence"] = total.item()
            # per step: the (unbiased) batch mean of D_k where step k was drawn, None where it was not
            metrics.update({f"div_{k + 1}": (v.item() / plan.step_weight if k in plan.steps else None)
                            for k, v in enumerate(per_step.mean(0))})
        else:
            metrics["divergence"] = None  # no reference pass at beta = 0; see eval_divergence
        for name, value in getattr(self.reward, "last_components", {}).items():
            if len(self.reward.rewards) > 1:
                metrics[f"reward_{name}"] = value.mean().item()
        metrics["loss"] = loss.item()
        return loss, metrics, images.detach().clamp(0, 1)
