"""Rewards of the digits world, registered by name. They score the world's images through the world
(`world.gold`, `world.image_reward`): a grid world applies the 8x8 models to each cell and averages."""

from __future__ import annotations

import torch

from cmalign.errors import UserError
from cmalign.rewards.base import Reward, RewardContext, reward_factory
from cmalign.worlds.digits.classifier import load_classifier
from cmalign.worlds.digits.data import parse_prompt
from cmalign.worlds.digits.proxy import build_default_proxy, load_proxy


class ModuleReward(Reward):
    def __init__(self, name: str, module: torch.nn.Module, device):
        self.name, self.module = name, module.to(device)

    def __call__(self, images, prompts):
        return self.module(images, prompts)


class ClassifierLogProb(torch.nn.Module):
    """log p(prompted class | image) under the independent classifier."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images01, prompts):
        labels = torch.tensor([parse_prompt(p) for p in prompts], device=images01.device)
        return self.classifier(images01).log_softmax(1).gather(1, labels[:, None]).squeeze(1)


class GoldReward(Reward):
    """The stand-in for human raters: evaluation and pair labels only, never a training signal."""

    name, differentiable, eval_only = "gold", False, True

    def __init__(self, score):
        self.score = score  # the world's gold: (images01, prompts) -> (B,)

    def __call__(self, images, prompts):
        return self.score(images, prompts).to(images.device)


def consistency_world(ctx: RewardContext):
    """The consistency model whose samples the digits rewards are fitted on: ddpo trains the DDPM teacher,
    but its proxy (and rating) are those of the consistency model's samples, shared by all methods."""
    world, cfg = ctx.world, ctx.config
    if getattr(world, "transition", None) is not None and cfg is not None:
        world = type(world).from_config(cfg, "cpu", lora=False)  # the same world class, on the consistency chain
    return world


def proxy_folder(ctx: RewardContext):
    """A user's folder (options proxy.path) or the cached default proxy's."""
    path = ctx.options.get("proxy", {}).get("path")
    if path is None:
        cfg = ctx.config
        path = build_default_proxy(consistency_world(ctx), cfg.digits.proxy_pairs if cfg else 2000, seed=0)
    return path


@reward_factory(worlds=("digits",))
def proxy_reward(ctx: RewardContext) -> Reward:
    """Bradley–Terry proxy: a user's folder (options proxy.path) or the cached default one."""
    return ModuleReward("proxy", ctx.world.image_reward(load_proxy(proxy_folder(ctx))), ctx.device)


@reward_factory(worlds=("digits",))
def classifier_reward(ctx: RewardContext) -> Reward:
    classifier = ClassifierLogProb(load_classifier(ctx.world.digit_resolution))
    return ModuleReward("classifier", ctx.world.image_reward(classifier), ctx.device)


@reward_factory(worlds=("digits",), differentiable=False, eval_only=True)
def gold_reward(ctx: RewardContext) -> Reward:
    return GoldReward(ctx.world.gold)


@reward_factory(worlds=("digits",), eval_only=True)
def heldout_proxy_reward(ctx: RewardContext) -> Reward:
    """The held-out judge as a named reward (evaluation only: training on it would defeat its purpose)."""
    cfg = ctx.config
    if cfg is None:
        raise UserError("heldout_proxy needs the run's config (its base model and digits.proxy_pairs)")
    world_cls = type(ctx.world)
    judge = world_cls.heldout_proxy_model(world_cls.pretrain_config(cfg), cfg.digits.proxy_pairs)
    return ModuleReward("heldout_proxy", judge, ctx.device)
