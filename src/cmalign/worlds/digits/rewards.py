"""Rewards of the digits world, registered by name."""

from __future__ import annotations

import torch

from cmalign.worlds.digits.data import parse_prompt
from cmalign.worlds.digits.classifier import load_classifier
from cmalign.worlds.digits.gold import gold_score
from cmalign.worlds.digits.proxy import build_default_proxy, load_proxy
from cmalign.errors import UserError
from cmalign.rewards.base import Reward, RewardContext, reward_factory


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

    def __call__(self, images, prompts):
        return gold_score(images, prompts).to(images.device)


def consistency_world(ctx: RewardContext):
    """The consistency model whose samples the digits rewards are fitted on: ddpo trains the DDPM teacher,
    but its proxy (and rating) are those of the consistency model's samples, shared by all methods."""
    world, cfg = ctx.world, ctx.config
    if getattr(world, "transition", None) is not None and cfg is not None:
        import dataclasses

        from cmalign.training.build import build_world

        world = build_world(dataclasses.replace(cfg, method="rocm"), lora=False)
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
    return ModuleReward("proxy", _per_cell(load_proxy(proxy_folder(ctx)), ctx.world), ctx.device)


def _per_cell(module, world):
    """On a compositional-digits world an 8x8 reward module scores each cell, averaged (worlds/digits_grid.py)."""
    from cmalign.worlds.digits.grid import PerCell

    grid = getattr(world, "grid", 1)
    if grid == 1 or isinstance(module, PerCell):
        return module
    if getattr(module, "config", {}).get("resolution", 8) != 8:
        raise UserError(f"a {grid}x{grid} digits grid needs an 8x8 (per-cell) digits proxy, not a "
                        f"{module.config['resolution']}x{module.config['resolution']} one")
    return PerCell(module, grid)


@reward_factory(worlds=("digits",))
def classifier_reward(ctx: RewardContext) -> Reward:
    if getattr(ctx.world, "grid", 1) > 1:  # per cell, averaged: the 8x8 classifier on each cell
        return ModuleReward("classifier", _per_cell(ClassifierLogProb(load_classifier(8)), ctx.world), ctx.device)
    return ModuleReward("classifier", ClassifierLogProb(load_classifier(ctx.world.resolution)), ctx.device)


@reward_factory(worlds=("digits",), differentiable=False, eval_only=True)
def gold_reward(ctx: RewardContext) -> Reward:
    return GoldReward()


HELDOUT_PROXY_SEED = 1  # the held-out judge: another seed, hence another pair set and initialisation


def heldout_proxy_model(pretrain, num_pairs: int, device="cpu") -> torch.nn.Module:
    """The held-out proxy of a base model: the same Bradley–Terry CNN on as many gold-labelled pairs, drawn
    with another seed (another pair set), from the CONSISTENCY model's samples whichever chain a method trains
    (ddpo's teacher included), cached. Scored beside gold and the training proxy in every digits evaluation:
    hacking shows as the training proxy rising while the held-out proxy and gold fall."""
    from cmalign.worlds.digits.world import DigitsWorld

    world = DigitsWorld.from_pretrained(pretrain, "cpu", which="consistency", lora_rank=None)
    return load_proxy(build_default_proxy(world, num_pairs, seed=HELDOUT_PROXY_SEED)).to(device)


@reward_factory(worlds=("digits",), eval_only=True)
def heldout_proxy_reward(ctx: RewardContext) -> Reward:
    """The held-out judge as a named reward (evaluation only: training on it would defeat its purpose)."""
    from cmalign.worlds.digits.pretrain import pretrain_config_for

    cfg = ctx.config
    if cfg is None:
        raise UserError("heldout_proxy needs the run's config (its base model and digits.proxy_pairs)")
    return ModuleReward("heldout_proxy", heldout_proxy_model(pretrain_config_for(cfg), cfg.digits.proxy_pairs), ctx.device)

