"""Rewards: a registry of differentiable (and a few non-differentiable) scores of images, which users
extend (register_reward, entry points `cmalign.rewards`, package.module:attribute)."""

from cmalign.rewards.registry import REWARDS, CallableReward, Reward, RewardContext, RewardSpec, WeightedReward, as_training_reward, available, build_reward, build_weighted, check_reward_names, register, register_reward, reward_context, reward_label, reward_options

__all__ = ["REWARDS", "CallableReward", "Reward", "RewardContext", "RewardSpec", "WeightedReward", "as_training_reward",
           "available", "build_reward", "build_weighted", "check_reward_names", "register", "register_reward",
           "reward_context", "reward_label", "reward_options"]
