"""Rewards: differentiable (and a few non-differentiable) scores of images, found by name in the
registry (registry.py) that users extend (register_reward, entry points `cmalign.rewards`,
package.module:attribute)."""

from __future__ import annotations

from cmalign.plugins import lazy_exports

# the public names, imported on first use so that `import cmalign.rewards` stays light
_NAMES = ("REWARDS", "CallableReward", "Reward", "RewardContext", "RewardSpec", "WeightedReward", "as_training_reward",
          "available", "build_reward", "build_weighted", "check_reward_names", "register_reward", "reward_context",
          "reward_label", "reward_options")
__all__ = list(_NAMES)

__getattr__ = lazy_exports("cmalign.rewards", dict.fromkeys(_NAMES, "cmalign.rewards.registry"))
