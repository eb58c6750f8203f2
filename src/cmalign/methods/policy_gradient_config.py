"""Settings of the policy-gradient family (rlcm, ddpo, dpok; d3po's inner loop): the `ppo` and `ddpo` config sections.

Kept apart from policy_gradient.py so that reading a config never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass
class DDPOConfig:
    """The ddpo baseline's chain: DDIM on the digits DDPM teacher."""

    steps: int = 20
    """DDIM steps of the ddpo chain (its K; num_steps is the consistency chain's)."""
    eta: float = 1.0
    """DDIM eta of the ddpo chain (1: DDPM-like stochastic steps, as DDPO)."""
