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
from cmalign.divergences import StepImportance, plan_from_config
from cmalign.errors import UserError
from cmalign.methods.base import Batch, Method
from cmalign.methods.hybrid import hybrid_objective
from cmalign.training.distributed import all_reduce_mean_


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
    # the cheap regulariser by default: one reference call per update, the step drawn in proportion to its
    # measured divergence (issue 24; docs/RESULTS.md, "Subsampled regulariser")
    auto_divergence_steps = 1
    auto_divergence_sampling = "importance"
    divergence_samplings = ("uniform", "importance")

    def __init__(self, cfg, world, reward):
        super().__init__(cfg, world, reward)
        self.timesteps = world.timesteps(cfg.num_steps)
        self.divergence_steps = type(self).divergence_steps(cfg)
        importance = self.divergence_steps != "all" and type(self).divergence_sampling(cfg) == "importance"
        self.importance = StepImportance(len(self.timesteps) - (cfg.final_step == "skip")) if importance else None
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
        plan = plan_from_config(cfg, len(self.timesteps), len(prompts), generator, shard, self.divergence_steps,
                                self.importance) if with_ref else None
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
            step_means = self._drawn_step_means(per_step, plan, shard)
            if self.importance is not None:
                self.importance.observe(step_means)
            # per step: the (unbiased) batch mean of D_k where step k was drawn, None where it was not
            metrics.update({f"div_{k + 1}": step_means.get(k) for k in range(per_step.shape[1])})
        else:
            metrics["divergence"] = None  # no reference pass at beta = 0; see eval_divergence
        for name, value in getattr(self.reward, "last_components", {}).items():
            if len(self.reward.rewards) > 1:
                metrics[f"reward_{name}"] = value.mean().item()
        metrics["loss"] = loss.item()
        return loss, metrics, images.detach().clamp(0, 1)

    @staticmethod
    def _drawn_step_means(per_step: torch.Tensor, plan, shard) -> dict[int, float]:
        """drawn step k -> the batch mean of D_k over the global batch (the same on every rank)."""
        means = per_step.detach().mean(0).double()
        if shard is not None and shard.count > 1:
            all_reduce_mean_(means, shard.count)
        return {k: float(means[k]) / plan.step_weight_of(k) for k in plan.steps}

    def state_dict(self):
        """The step-importance averages (exact resume: the next draws depend on them)."""
        return (self.importance.state_dict(), {}) if self.importance is not None else ({}, {})

    def load_state_dict(self, tensors, meta):
        if self.importance is None:
            return super().load_state_dict(tensors, meta)
        if "step_importance_average" not in tensors:
            raise UserError("the checkpoint has no step-importance state, which this run's divergence_sampling importance needs")
        self.importance.load_state_dict(tensors)
