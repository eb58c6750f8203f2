"""Settings of the policy-gradient family (rlcm, ddpo, dpok; d3po's inner loop): the `ppo` and `ddpo` config sections.

Kept apart from policy_gradient.py so that reading a config never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmalign.errors import UserError


@dataclass
class PPOConfig:
    """Policy-gradient baselines (rlcm, ddpo, dpok) and d3po's inner loop."""

    clip: float = 1e-4
    """PPO ratio clip range epsilon (RLCM and DDPO default)."""
    epochs: int = 2
    """PPO inner epochs over each batch of rollouts."""
    minibatches: int = 2
    """Minibatches per inner epoch (one optimiser update each)."""
    adv_clip: float = 10.0
    """Clip normalised advantages to [-adv_clip, adv_clip]."""
    stat_buffer: int = 32
    """Per-prompt reward buffer for advantage normalisation (0: batch statistics only)."""
    stat_min_count: int = 16
    """Rewards a prompt needs in its buffer before its own statistics replace the batch's."""

    def check(self) -> None:
        if not (self.clip > 0 and self.epochs >= 1 and self.minibatches >= 1):
            raise UserError("ppo.clip must be > 0, ppo.epochs and ppo.minibatches >= 1")
        if not (self.adv_clip > 0 and self.stat_buffer >= 0 and self.stat_min_count >= 1):
            raise UserError("ppo.adv_clip must be > 0, ppo.stat_buffer >= 0, ppo.stat_min_count >= 1")


@dataclass
class DDPOConfig:
    """The ddpo baseline's chain: DDIM on the digits DDPM teacher."""

    steps: int = 20
    """DDIM steps of the ddpo chain (its K; num_steps is the consistency chain's)."""
    eta: float = 1.0
    """DDIM eta of the ddpo chain (1: DDPM-like stochastic steps, as DDPO)."""

    def check(self) -> None:
        if not (2 <= self.steps <= 1000 and self.eta >= 0):
            raise UserError("ddpo.steps must be in [2, 1000] and ddpo.eta >= 0")
