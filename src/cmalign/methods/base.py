"""What every alignment method offers the trainer, which names none of them.

A method is built from (config, world, reward) and makes one training step from a `Batch`: it draws
its own rollouts through chain.run_chain, calls `optimizer_step(loss)` (zero_grad, backward,
cross-rank mean, clip, step; returns the gradient norm, NaN when the update was skipped) once per
update, and returns (metrics, images in [0, 1]). Hooks with defaults: `check_config` (refuse
settings this method cannot run), `transition` (the chain its world must sample: None for the
consistency chain), `chain_length`, `batch_prompts` (pairwise methods widen the prompt batch),
`state_dict` / `load_state_dict` (everything beyond the parameters that exact resume needs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from cmalign.chain import ChainNoise
from cmalign.training.distributed import SINGLE, Shard
from cmalign.errors import UserError

OptimizerStep = Callable[[torch.Tensor], float]


@dataclass
class Batch:
    """One step's input: this rank's prompts, the run's generator (seeded identically on every rank)
    and the rank's shard of the global batch."""

    prompts: list[str]
    generator: torch.Generator
    shard: Shard = SINGLE

    def noise(self, world, num_steps: int, batch: int | None = None) -> ChainNoise:
        """Fixed chain noise for this rank's chains, drawn as a slice of the global batch."""
        n = len(self.prompts) if batch is None else batch
        return ChainNoise.draw(n, world.latent_shape, num_steps, self.generator, world.device, world.dtype, shard=self.shard)


class Method(ABC):
    name: str = "method"
    config_sections: dict[str, type] = {}  # section name -> settings dataclass this method owns (config/sections.py)
    per_step_divergence: bool = False  # True: the objective has the per-step divergence term that divergence_steps subsamples
    needs_differentiable_reward: bool = False  # True: refuse a reward without a gradient (draft)
    # True: non-differentiable reward terms are estimated through the chain's step log-probabilities
    # (rocm's hybrid estimator), which needs at least one stochastic step (K >= 2)
    score_function_rewards: bool = False
    needs_log_prob: bool = False  # True: the method scores the chain's step log-probabilities (a stochastic chain)
    # divergence_steps / divergence_sampling "auto": the method's own choice, and the samplings it supports
    auto_divergence_steps: str | int = "all"
    auto_divergence_sampling: str = "uniform"
    divergence_samplings: tuple[str, ...] = ("uniform",)

    def __init__(self, cfg, world, reward):
        if self.needs_differentiable_reward and not getattr(reward, "differentiable", True):
            raise UserError(
                f"{self.name} back-propagates through the reward, but {getattr(reward, 'name', 'the reward')} is not "
                "differentiable; use rocm (its score-function estimator) or a policy-gradient method (rlcm, ddpo)")
        type(self).check_chain(getattr(world, "transition", None))
        self.cfg, self.world, self.reward = cfg, world, reward

    # --- hooks read before the method exists ---------------------------------------------------------
    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse (UserError) settings this method cannot run; never change cfg."""

    @classmethod
    def check_chain(cls, transition) -> None:
        """Refuse (UserError) a chain this method cannot train on: the world's transition (None: the consistency
        chain), which reports `deterministic` when no step adds noise."""
        if cls.needs_log_prob and getattr(transition, "deterministic", False):
            raise UserError(f"{cls.name} needs the chain's step log-probabilities, but the world's chain ({transition}) "
                            "is deterministic; use a stochastic chain (e.g. lcm.tcd_gamma > 0) or rocm/draft")

    @classmethod
    def divergence_steps(cls, cfg) -> str | int:
        """The steps of the per-step divergence evaluated per update: "all" or N (cfg.divergence_steps resolved)."""
        if cfg.divergence_steps != "auto":
            return cfg.divergence_steps
        return cls.auto_divergence_steps if cls.per_step_divergence and cfg.beta > 0 else "all"

    @classmethod
    def divergence_sampling(cls, cfg) -> str:
        """How divergence_steps N draws its steps: uniform or importance (cfg.divergence_sampling resolved)."""
        return cls.auto_divergence_sampling if cfg.divergence_sampling == "auto" else cfg.divergence_sampling

    @classmethod
    def transition(cls, cfg):
        """The per-step update the world must use (None: the consistency chain)."""
        return None

    @classmethod
    def chain_length(cls, cfg) -> int:
        """K of the chain this method samples (and the evaluation scores)."""
        return cfg.num_steps

    # --- the step ----------------------------------------------------------------------------------
    def batch_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts of one step from the trainer's draw (pairwise methods repeat them)."""
        return prompts

    @abstractmethod
    def step(self, batch: Batch, optimizer_step: OptimizerStep) -> tuple[dict, torch.Tensor]:
        """One training step: (metrics of floats, images in [0, 1] of this rank's chains)."""

    # --- exact resume --------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able scalars) of the method's own state (reward buffers, ...)."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if tensors or meta:
            raise UserError(f"the checkpoint holds method state that {self.name} does not use")
