"""What a reward is: the Reward base class, what a factory receives (RewardContext) and a registry entry
(RewardSpec). A leaf module: every reward module imports from here, and this imports nothing of cmalign.

A reward maps images (B, C, H, W), nominally in [0, 1], and their prompts to one float score per
image. Any callable of that signature is a reward; its optional `differentiable` attribute (default
True) says whether its gradient with respect to the images is meaningful (ROCM needs it) and
`eval_only` marks scores that must never become a training signal (the digits gold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class Reward:
    """Base class of rewards (optional: any callable with this signature is a reward)."""

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


@dataclass
class RewardSpec:
    """A registry entry: factory(ctx) -> reward, the worlds it scores (None: any) and its flags, known
    before anything heavy loads."""

    factory: Callable[[RewardContext], Any]
    worlds: tuple[str, ...] | None = None
    differentiable: bool = True
    eval_only: bool = False
    source: Any = None  # what a user registered or named (a function, class or factory): whose code runs


def reward_factory(worlds: tuple[str, ...] | None = None, differentiable: bool = True, eval_only: bool = False):
    """Decorator of a built-in factory(ctx) -> reward: turns it into the RewardSpec that the registry's
    "module:attribute" string names (nothing is registered by importing a reward module)."""

    def wrap(factory: Callable[[RewardContext], Any]) -> RewardSpec:
        return RewardSpec(factory, worlds, differentiable, eval_only)

    return wrap
