"""Rewards: differentiable (and a few non-differentiable) scores of images, found by name in the
registry (registry.py) that users extend (register_reward, entry points `cmalign.rewards`,
package.module:attribute)."""

from __future__ import annotations

import importlib

# the public names, imported on first use so that `import cmalign.rewards` stays light
_NAMES = ("REWARDS", "CallableReward", "Reward", "RewardContext", "RewardSpec", "WeightedReward", "as_training_reward",
          "available", "build_reward", "build_weighted", "check_reward_names", "register_reward", "reward_context",
          "reward_label", "reward_options")
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module("cmalign.rewards.registry"), name)
    raise AttributeError(f"module 'cmalign.rewards' has no attribute {name!r}")
