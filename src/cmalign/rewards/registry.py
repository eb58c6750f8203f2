"""Reward registry (name -> factory) and weighted sums of rewards.

A reward maps images (B, C, H, W), nominally in [0, 1], and their prompts to one score per image.
`differentiable` says whether its gradient with respect to the images is meaningful (ROCM needs
it); `eval_only` marks scores that must never become a training signal (the digits gold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UserError


class Reward:
    name: str = "reward"
    differentiable: bool = True
    eval_only: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class RewardContext:
    """What a factory may need: the world it scores for, the training config, per-reward options."""

    world: Any
    config: Any = None
    options: dict[str, dict] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")


def reward_context(world, cfg, device=None) -> RewardContext:
    """Per-reward options from a TrainConfig: reward_paths (and proxy_path for the digits proxy)."""
    options = {name: {"path": path} for name, path in cfg.reward_paths.items()}
    if getattr(cfg, "proxy_path", None):
        options.setdefault("proxy", {})["path"] = cfg.proxy_path
    return RewardContext(world, cfg, options, torch.device(device) if device else world.device)


REWARDS: dict[str, tuple[Callable[[RewardContext], Reward], tuple[str, ...]]] = {}


def register(name: str, worlds: tuple[str, ...]):
    """Decorator: register a factory under `name` for the given worlds."""

    def wrap(factory):
        REWARDS[name] = (factory, worlds)
        return factory

    return wrap


def _ensure_loaded() -> None:
    from . import digits_rewards  # noqa: F401  (registers the digits rewards)

    try:
        from . import lcm_rewards  # noqa: F401  (registers the text-to-image rewards)
    except ImportError:
        pass


def available(world: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(n for n, (_, worlds) in REWARDS.items() if world is None or world in worlds)


def build_reward(name: str, ctx: RewardContext) -> Reward:
    _ensure_loaded()
    world = ctx.world.name
    if name not in REWARDS or world not in REWARDS[name][1]:
        raise UserError(f"unknown reward {name!r} for the {world} world; available: {', '.join(available(world))}")
    return REWARDS[name][0](ctx)


class WeightedReward(Reward):
    """sum_i w_i r_i(images, prompts); `last_components` keeps each term of the last call for logging."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        self.rewards, self.weights = rewards, weights
        self.differentiable = all(r.differentiable for r in rewards.values())
        self.eval_only = any(r.eval_only for r in rewards.values())
        self.name = "+".join(f"{w:g}*{n}" for n, w in weights.items())
        self.last_components: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = 0.0
        self.last_components = {}
        for name, reward in self.rewards.items():
            value = reward(images, prompts)
            if value.shape != (images.shape[0],) or not value.is_floating_point():
                raise UserError(
                    f"reward {name!r} returned shape {tuple(value.shape)} dtype {value.dtype}; "
                    f"expected a float tensor of shape ({images.shape[0]},)"
                )
            self.last_components[name] = value.detach()
            total = total + self.weights[name] * value
        return total


def build_weighted(weights: dict[str, float], ctx: RewardContext) -> WeightedReward:
    if not weights:
        raise UserError("no reward named: give at least one, e.g. reward_weights {proxy: 1.0}")
    return WeightedReward({name: build_reward(name, ctx) for name in weights}, dict(weights))
