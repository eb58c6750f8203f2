"""Rewards: a registry of differentiable (and a few non-differentiable) scores of images."""

from .registry import REWARDS, Reward, RewardContext, WeightedReward, available, build_reward, build_weighted, register, reward_context

__all__ = ["REWARDS", "Reward", "RewardContext", "WeightedReward", "available", "build_reward", "build_weighted", "register", "reward_context"]
