"""Reward registry and weighted sums of rewards.

A name in `reward_weights` resolves to a registered reward (built-in or `register_reward`), an entry
point of the group `cmalign.rewards`, or a `package.module:attribute` import path. What it names may
be a reward callable (a plain function works), a Reward subclass (instantiated, with the
RewardContext if its constructor takes one), or a factory registered with `factory=True`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch

from cmalign.errors import UserError
from cmalign.plugins import Registry, as_plugin_error, plugin_module
from cmalign.rewards.base import Reward, RewardContext, RewardSpec


def split_option_key(key: str) -> tuple[str, str]:
    """"pickscore" -> (pickscore, path); "pickscore.tokenizer" -> (pickscore, tokenizer);
    "mypkg.scores:sharp" -> (mypkg.scores:sharp, path); "mypkg.scores:sharp.model" -> (..., model)."""
    head, sep, tail = key.rpartition(".")
    if sep and head and tail and ":" not in tail:
        return head, tail
    return key, "path"


def reward_options(reward_paths: dict[str, str]) -> dict[str, dict[str, str]]:
    options: dict[str, dict[str, str]] = {}
    for key, path in reward_paths.items():
        name, component = split_option_key(key)
        options.setdefault(name, {})[component] = path
    return options


def reward_context(world, cfg, device=None) -> RewardContext:
    """Per-reward options from a TrainConfig: reward_paths (and digits.proxy_path for the digits proxy)."""
    options = reward_options(cfg.reward_paths)
    proxy_path = getattr(getattr(cfg, "digits", None), "proxy_path", None)
    if proxy_path:
        options.setdefault("proxy", {})["path"] = proxy_path
    return RewardContext(world, cfg, options, torch.device(device) if device else world.device)


# name -> "module:attribute" of its RewardSpec, imported on first use
BUILTIN_REWARDS = {
    "proxy": "cmalign.worlds.digits.rewards:proxy_reward",
    "classifier": "cmalign.worlds.digits.rewards:classifier_reward",
    "gold": "cmalign.worlds.digits.rewards:gold_reward",
    "heldout_proxy": "cmalign.worlds.digits.rewards:heldout_proxy_reward",
    "rating": "cmalign.worlds.digits.rating:rating_reward",
    "http": "cmalign.rewards.http:http_reward",
    **{name: f"cmalign.rewards.text_to_image.factories:{attr}" for name, attr in (
        ("clip_score", "clip_score"), ("pickscore", "pickscore"), ("hpsv2", "hpsv2"), ("hpsv2_1", "hpsv2_1"),
        ("aesthetic", "aesthetic"), ("image_reward", "image_reward_"), ("jpeg_compressibility", "jpeg_compressibility"),
        ("jpeg_incompressibility", "jpeg_incompressibility"))},
}


def _builtins() -> None:
    for name, where in BUILTIN_REWARDS.items():
        REWARDS.register(name, where)


REWARDS = Registry("reward", "cmalign.rewards", _builtins)


def register_reward(name: str, reward: Any = None, *, worlds: tuple[str, ...] | None = None,
                    differentiable: bool | None = None, factory: bool = False, replace: bool = False):
    """Register a reward under `name`: a callable (images, prompts) -> (B,) scores, a Reward subclass,
    or with factory=True a function ctx -> reward. Usable as @register_reward("name")."""

    def put(obj):
        spec = as_spec(obj, name, factory=factory)
        if worlds is not None:
            spec.worlds = tuple(worlds)
        if differentiable is not None:
            spec.differentiable = bool(differentiable)
        REWARDS.register(name, spec, replace=replace)
        return obj

    return put if reward is None else put(reward)


def _takes_context(cls) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def as_spec(obj: Any, name: str, factory: bool = False) -> RewardSpec:
    """A RewardSpec for whatever a reward name resolved to."""
    if isinstance(obj, RewardSpec):
        return obj
    flags = dict(differentiable=bool(getattr(obj, "differentiable", True)), eval_only=bool(getattr(obj, "eval_only", False)))
    if factory:
        return RewardSpec(obj, None, **flags, source=obj)
    if isinstance(obj, type):
        make = (lambda ctx: obj(ctx)) if _takes_context(obj) else (lambda ctx: obj())
        return RewardSpec(make, getattr(obj, "worlds", None), **flags, source=obj)
    if callable(obj):
        return RewardSpec(lambda ctx: obj, getattr(obj, "worlds", None), **flags, source=obj)
    raise UserError(f"reward {name!r} is {type(obj).__name__}, not a callable (images, prompts) -> scores")


def reward_spec(name: str) -> RewardSpec:
    return as_spec(REWARDS.get(name), name)


def available(world: str | None = None) -> list[str]:
    out = []
    for n in REWARDS.names():
        try:
            spec = reward_spec(n)
        except UserError:
            continue
        if world is None or spec.worlds is None or world in spec.worlds:
            out.append(n)
    return out


def check_reward_names(cfg, world_cls=None, method_cls=None) -> None:
    """Every reward of cfg.reward_weights exists for the world, may train, suits the method (draft needs
    gradients; rocm's score-function estimate of a non-differentiable one needs K >= 2), and every reward_paths entry names one of them: all before any model loads."""
    specs = {}
    for name, weight in cfg.reward_weights.items():
        spec = specs[name] = reward_spec(name)
        if spec.worlds is not None and cfg.world not in spec.worlds:
            raise UserError(f"unknown reward {name!r} for the {cfg.world} world; available: {', '.join(available(cfg.world))}")
        if spec.eval_only:
            raise UserError(f"{name} is an evaluation score (the stand-in for human raters) and never a training reward; "
                            "train on proxy")
    nondiff = [n for n, s in specs.items() if not s.differentiable]
    if method_cls is not None and nondiff and getattr(method_cls, "needs_differentiable_reward", False):
        raise UserError(f"{method_cls.name} back-propagates through the reward, but {', '.join(nondiff)} is not "
                        "differentiable; use rocm (its score-function estimator) or a policy-gradient method (rlcm, ddpo)")
    if method_cls is not None and nondiff and getattr(method_cls, "score_function_rewards", False) \
            and method_cls.chain_length(cfg) < 2:
        raise UserError(f"{method_cls.name} estimates the gradient of {', '.join(nondiff)} (not differentiable) through "
                        "the chain's stochastic steps, and K = 1 has none; use num_steps >= 2 or a differentiable reward")
    transition = world_cls.chain_transition(cfg) if hasattr(world_cls, "chain_transition") else None
    if method_cls is not None and nondiff and getattr(method_cls, "score_function_rewards", False) \
            and getattr(transition, "deterministic", False):
        raise UserError(f"{method_cls.name} estimates the gradient of {', '.join(nondiff)} (not differentiable) through "
                        f"the chain's stochastic steps, and the world's chain ({transition}) is deterministic; use a "
                        "stochastic chain (e.g. lcm.tcd_gamma > 0) or a differentiable reward")
    stray = sorted({split_option_key(k)[0] for k in cfg.reward_paths} - set(cfg.reward_weights))
    if stray:
        raise UserError(f"reward_paths names {', '.join(stray)}, which reward_weights does not use "
                        f"(in use: {', '.join(cfg.reward_weights)})")
    for key, value in cfg.reward_paths.items():
        # an explicit local path (not a hub id or URL) that does not exist: say so before any model loads
        if value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            raise UserError(f"no such file or folder: {value} (given with --reward-paths {key}=PATH)")


class CallableReward(Reward):
    """A user's callable as a Reward: its name and flags, and a check of what it returns."""

    def __init__(self, name: str, fn: Callable, differentiable: bool = True, eval_only: bool = False):
        self.name, self.fn, self.differentiable, self.eval_only = name, fn, differentiable, eval_only

    def __call__(self, images, prompts):
        return self.fn(images, prompts)


def build_reward(name: str, ctx: RewardContext) -> Reward:
    spec = reward_spec(name)
    world = ctx.world.name
    if spec.worlds is not None and world not in spec.worlds:
        raise UserError(f"unknown reward {name!r} for the {world} world; available: {', '.join(available(world))}")
    try:
        reward = spec.factory(ctx)
    except Exception as exc:  # noqa: BLE001 - a plug-in's constructor: one line naming it (its traceback under --debug)
        error = as_plugin_error(exc, reward_plugins({name: 1.0}), "while it was built")
        if error is None:
            raise
        raise error from exc
    if not callable(reward):
        raise UserError(f"reward {name!r}: its factory returned {type(reward).__name__}, not a callable")
    check_signature(name, reward)
    if not isinstance(reward, Reward):
        reward = CallableReward(name, reward, spec.differentiable, spec.eval_only)
    return reward


def check_signature(name: str, reward: Any) -> None:
    """A reward is called as reward(images, prompts): refuse one that cannot be, in one line."""
    try:
        sig = inspect.signature(reward)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: it is tried as it is
        return
    try:
        sig.bind(None, None)
    except TypeError:
        raise UserError(f"reward {name!r} must be a callable (images, prompts) -> scores of shape (B,); "
                        f"its signature is {sig}") from None


def reward_plugins(weights: dict[str, float], reward: Any = None) -> dict[str, str]:
    """module -> "reward 'NAME'" for the rewards of a run whose code is not cmalign's (blamed for their exceptions)."""
    out = {}
    if reward is not None:
        fn = reward.fn if isinstance(reward, CallableReward) else reward
        module = plugin_module(fn)
        return {module: f"reward {getattr(reward, 'name', None) or reward_label(reward)!r}"} if module else {}
    for name in weights:
        if REWARDS.is_builtin(name):
            continue
        try:
            spec = reward_spec(name)
        except UserError:
            continue
        module = plugin_module(spec.source if spec.source is not None else spec.factory)
        if module:
            out[module] = f"reward {name!r}"
    return out


class WeightedReward(Reward):
    """sum_i w_i r_i(images, prompts); `last_components` keeps each term of the last call for logging."""

    def __init__(self, rewards: dict[str, Any], weights: dict[str, float]):
        self.rewards, self.weights = rewards, weights
        self.differentiable = all(getattr(r, "differentiable", True) for r in rewards.values())
        self.eval_only = any(getattr(r, "eval_only", False) for r in rewards.values())
        self.name = "+".join(f"{w:g}*{n}" for n, w in weights.items())
        self.last_components: dict[str, torch.Tensor] = {}
        self.gradient_checked: set[str] = set()  # differentiable rewards whose scores were seen to reach the images

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = 0.0
        self.last_components = {}
        for name, reward in self.rewards.items():
            value = reward(images, prompts)
            check_scores(name, value, images)
            if name not in self.gradient_checked and images.requires_grad and torch.is_grad_enabled() \
                    and getattr(reward, "differentiable", True):
                check_gradient(name, value, images)
                self.gradient_checked.add(name)
            self.last_components[name] = value.detach()
            total = total + self.weights[name] * value
        return total


def check_scores(name: str, value: Any, images: torch.Tensor) -> None:
    """What a reward returned is one float score per image, on the images' device (NaN/inf scores are the
    trainer's skip-and-count path, not refused here)."""
    b = images.shape[0]
    if not isinstance(value, torch.Tensor) or value.shape != (b,) or not value.is_floating_point():
        what = f"shape {tuple(value.shape)} dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(f"reward {name!r} returned {what}; expected a float tensor of shape ({b},)")
    if value.device != images.device:
        raise UserError(f"reward {name!r} returned scores on {value.device}; the images are on {images.device}: "
                        "return them on the images' device")


def check_gradient(name: str, value: torch.Tensor, images: torch.Tensor) -> None:
    """A differentiable reward's scores carry a gradient to the images (once, on the first training batch):
    a detached reward would train nothing while every step reports success."""
    reaches = value.requires_grad and torch.autograd.grad(value.sum(), images, retain_graph=True, allow_unused=True)[0] is not None
    if not reaches:
        raise UserError(f"reward {name!r} is differentiable by default, but its scores carry no gradient to the images "
                        "(detached, or computed without them); if it is not differentiable, set `differentiable = False` "
                        "on it (or register it with differentiable=False) so that rocm uses its score-function estimator")


def build_weighted(weights: dict[str, float], ctx: RewardContext) -> WeightedReward:
    if not weights:
        raise UserError("no reward named: give at least one, e.g. reward_weights {proxy: 1.0}")
    return WeightedReward({name: build_reward(name, ctx) for name in weights}, dict(weights))


def reward_label(reward: Any) -> str:
    """The name a run's config records for a ready reward object: its import path where it has one (so that
    `cmalign eval --run` scores with it), else python:<name>, which no later command can mistake for another reward."""
    module, qualname = getattr(reward, "__module__", None), getattr(reward, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module != "__main__" and "<" not in qualname:
        return f"{module}:{qualname}"
    return "python:" + str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def as_training_reward(reward: Any, name: str | None = None) -> WeightedReward:
    """A ready reward object (from the Python API) as the run's training reward."""
    if isinstance(reward, WeightedReward):
        return reward
    if not callable(reward):
        raise UserError(f"reward must be a callable (images, prompts) -> scores, got {type(reward).__name__}")
    name = name or getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__
    if not isinstance(reward, Reward):
        check_signature(name, reward)
        reward = CallableReward(name, reward, bool(getattr(reward, "differentiable", True)),
                                bool(getattr(reward, "eval_only", False)))
    if reward.eval_only:
        raise UserError(f"{name} is an evaluation-only score and never a training reward")
    return WeightedReward({name: reward}, {name: 1.0})
