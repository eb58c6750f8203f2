"""Rewards of the lcm world, registered by name. Each factory reads its options from
ctx.options[name]: `--reward-paths NAME=PATH NAME.COMPONENT=PATH` gives {"path": ..., COMPONENT: ...},
and each option is a keyword argument of the loader, so the loaders' keyword parameters are the
components (pickscore: path, tokenizer; hpsv2/hpsv2_1: path, architecture, tokenizer; aesthetic: path,
clip; image_reward: path, config, tokenizer; clip_score: path, tokenizer). See docs/rewards.md."""

from __future__ import annotations

import inspect
from typing import Callable

from cmalign.errors import UserError
from cmalign.rewards.text_to_image import clip as clip_rewards
from cmalign.rewards.text_to_image import image_reward
from cmalign.rewards.text_to_image import jpeg
from cmalign.rewards.text_to_image.preprocess import reward_dtype
from cmalign.rewards.base import Reward, RewardContext, reward_factory


def _build(name: str, loader: Callable[..., Reward], ctx: RewardContext, **fixed) -> Reward:
    options = dict(ctx.options.get(name, {}))
    allowed = set(inspect.signature(loader).parameters) - {"device", "dtype"} - set(fixed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"reward {name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))} "
                        f"(--reward-paths {name}.COMPONENT=PATH)")
    return loader(device=ctx.device, dtype=reward_dtype(ctx.config), **fixed, **options)


@reward_factory(worlds=("lcm",))
def clip_score(ctx: RewardContext) -> Reward:
    """Cosine similarity of CLIP ViT-L/14 image and prompt embeddings."""
    return _build("clip_score", clip_rewards.clip_score, ctx)


@reward_factory(worlds=("lcm",))
def pickscore(ctx: RewardContext) -> Reward:
    """PickScore_v1: CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences (logit-scaled cosine)."""
    return _build("pickscore", clip_rewards.pickscore, ctx)


@reward_factory(worlds=("lcm",))
def hpsv2(ctx: RewardContext) -> Reward:
    """Human Preference Score v2."""
    return _build("hpsv2", clip_rewards.hpsv2, ctx, version="v2")


@reward_factory(worlds=("lcm",))
def hpsv2_1(ctx: RewardContext) -> Reward:
    """Human Preference Score v2.1."""
    return _build("hpsv2_1", clip_rewards.hpsv2, ctx, version="v2.1")


@reward_factory(worlds=("lcm",))
def aesthetic(ctx: RewardContext) -> Reward:
    """LAION aesthetic predictor v2 on CLIP ViT-L/14 (DDPO's aesthetic task)."""
    return _build("aesthetic", clip_rewards.aesthetic, ctx)


@reward_factory(worlds=("lcm",))
def image_reward_(ctx: RewardContext) -> Reward:
    """ImageReward v1.0 (BLIP-based)."""
    return _build("image_reward", image_reward.image_reward, ctx)


@reward_factory(worlds=("lcm",), differentiable=False)
def jpeg_compressibility(ctx: RewardContext) -> Reward:
    """Minus the JPEG size in kB (not differentiable)."""
    return jpeg.JpegSize("jpeg_compressibility", -1.0)


@reward_factory(worlds=("lcm",), differentiable=False)
def jpeg_incompressibility(ctx: RewardContext) -> Reward:
    """The JPEG size in kB (not differentiable)."""
    return jpeg.JpegSize("jpeg_incompressibility", 1.0)
