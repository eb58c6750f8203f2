"""Refuse impossible settings with one clear line each (UserError); a config is never changed.

Common fields are checked here; each section checks its own values (its `check()`), and the world's and
the method's classes add what only they know (`check_config`), so that a setting of one method (e.g.
ppo.minibatches) never refuses another method's run.
"""

from __future__ import annotations

import dataclasses

from cmalign.config.train import DIVERGENCE_NAMES, TrainConfig
from cmalign.config.types import check_fields
from cmalign.errors import UserError
from cmalign.methods.registry import method_class
from cmalign.rewards.registry import available, check_reward_names, reward_spec, split_option_key
from cmalign.training.full_finetune import check_config as check_finetune
from cmalign.training.tracking import check_trackers
from cmalign.worlds.registry import world_class

MAX_BATCH = 1 << 16  # beyond this no world here can allocate a chain; refuse before an allocator trace


def need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_types(cfg: TrainConfig) -> None:
    """cfg is a TrainConfig whose every field has its declared type: the first check, before any name is looked up."""
    if not isinstance(cfg, TrainConfig):
        raise UserError(f"expected a TrainConfig, got {type(cfg).__name__}")
    check_fields(cfg, TrainConfig, skip=("sections",))
    for name, section in cfg.sections.items():
        check_fields(section, type(section), f"{name}.")


def _check_chain_and_objective(cfg: TrainConfig, method_cls) -> None:
    need(cfg.divergence in DIVERGENCE_NAMES, f"unknown divergence {cfg.divergence!r}; expected one of {', '.join(DIVERGENCE_NAMES)}")
    need(cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}")
    need(cfg.num_steps >= 1, f"num_steps (K) must be >= 1, got {cfg.num_steps}")
    need(cfg.num_steps <= 50, f"num_steps (K) must be <= 50 (the LCM grid), got {cfg.num_steps}")
    if cfg.backprop_steps is not None:
        need(1 <= cfg.backprop_steps <= cfg.num_steps, f"backprop_steps must be in [1, K={cfg.num_steps}], got {cfg.backprop_steps}")
    need(cfg.reward_scale > 0, f"reward_scale must be > 0, got {cfg.reward_scale}")
    need(cfg.js_samples >= 1, f"js_samples must be >= 1, got {cfg.js_samples}")
    _check_divergence_subsampling(cfg, method_cls)


def _check_divergence_subsampling(cfg: TrainConfig, method_cls) -> None:
    """divergence_steps / _fraction / _sampling: explicit values only where they apply ("auto" is the method's choice)."""
    explicit_steps = cfg.divergence_steps not in ("auto", "all")
    if explicit_steps or cfg.divergence_fraction != 1.0:
        k = method_cls.chain_length(cfg)
        terms = k - (cfg.final_step == "skip")
        need(not explicit_steps or 1 <= cfg.divergence_steps <= terms,
             f"divergence_steps must be auto, all or in [1, {terms}] (the regularised steps of K={k}, "
             f"final_step {cfg.final_step}), got {cfg.divergence_steps}")
        need(0 < cfg.divergence_fraction <= 1, f"divergence_fraction must be in (0, 1], got {cfg.divergence_fraction}")
        need(cfg.beta > 0, "divergence_steps / divergence_fraction subsample the divergence term, which beta = 0 switches off")
        need(method_cls.per_step_divergence,
             f"divergence_steps / divergence_fraction subsample a per-step divergence term, which {cfg.method} does not have (rocm, dpok)")
    if cfg.divergence_sampling != "auto":
        need(method_cls.per_step_divergence and cfg.beta > 0 and method_cls.divergence_steps(cfg) != "all",
             f"divergence_sampling {cfg.divergence_sampling} chooses which steps divergence_steps N draws, but this run "
             f"evaluates every step ({cfg.method}, beta {cfg.beta:g}, divergence_steps {cfg.divergence_steps}); drop it")
        need(cfg.divergence_sampling in method_cls.divergence_samplings,
             f"{cfg.method} draws its divergence steps {' or '.join(method_cls.divergence_samplings)}, "
             f"not {cfg.divergence_sampling}")


def _check_optimisation(cfg: TrainConfig) -> None:
    need(1 <= cfg.batch_size <= MAX_BATCH, f"batch_size must be >= 1 (and at most {MAX_BATCH}), got {cfg.batch_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {cfg.grad_clip}")
    need(cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}")
    need(cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if cfg.max_train_seconds is not None:
        need(cfg.max_train_seconds > 0, f"max_train_seconds must be > 0, got {cfg.max_train_seconds}")


def check_scored_rewards(weights: dict, reward_paths: dict, world_cls, what: str, also_used: tuple = ()) -> None:
    """Rewards that are only scored (cmalign eval's, the held-out eval_reward_weights): each exists for the world
    (evaluation scores such as gold included), has a finite weight, and every reward_paths entry names a reward in use."""
    world = getattr(world_cls, "name", None) or "this"
    for name, weight in weights.items():
        need(bool(name.strip()), f"{what} has an empty reward name")
        spec = reward_spec(name)
        if spec.worlds is not None and world not in spec.worlds:
            raise UserError(f"unknown reward {name!r} for the {world} world; available: {', '.join(available(world))}")
        need(isinstance(weight, (int, float)) and weight == weight and abs(weight) != float("inf"),
             f"{what}: the weight of {name} must be a finite number, got {weight}")
    stray = sorted({split_option_key(k)[0] for k in reward_paths} - set(weights) - set(also_used))
    need(not stray, f"reward_paths names {', '.join(stray)}, which {what} does not use (in use: {', '.join([*weights, *also_used])})")


def _check_rewards(cfg: TrainConfig, world_cls, method_cls) -> None:
    need(bool(cfg.reward_weights), "reward_weights is empty: name at least one reward")
    need(all(n.strip() for n in cfg.reward_weights), "reward_weights has an empty reward name")
    held_out = cfg.eval_reward_weights
    both = sorted(set(held_out) & set(cfg.reward_weights))
    need(not both, f"eval_reward_weights names {', '.join(both)}, which the loss uses: a held-out reward is never trained on")
    # reward_paths may name the held-out rewards too: the training rewards' check sees its own entries only
    own = {k: v for k, v in cfg.reward_paths.items() if split_option_key(k)[0] not in held_out}
    check_reward_names(cfg if len(own) == len(cfg.reward_paths) else with_paths(cfg, own), world_cls, method_cls)
    check_scored_rewards(held_out, cfg.reward_paths, world_cls, "eval_reward_weights", tuple(cfg.reward_weights))


def with_paths(cfg: TrainConfig, reward_paths: dict) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, reward_paths=reward_paths)


def _check_run(cfg: TrainConfig) -> None:
    """Evaluation, logging, prompts and reliability."""
    need(cfg.eval_every >= 1 and cfg.grid_every >= 1, "eval_every and grid_every must be >= 1")
    need(1 <= cfg.eval_size <= MAX_BATCH, f"eval_size must be >= 1 (and at most {MAX_BATCH}), got {cfg.eval_size}")
    need(0 <= cfg.final_eval_size <= MAX_BATCH, f"final_eval_size must be >= 0 (and at most {MAX_BATCH}), got {cfg.final_eval_size}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {cfg.max_bad_steps}")
    if cfg.ema_decay is not None:
        need(0 < cfg.ema_decay < 1, f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.eval_prompts is not None:
        need(len(cfg.eval_prompts) > 0 and all(p.strip() for p in cfg.eval_prompts), "eval_prompts must be non-empty strings")
    if cfg.prompts is not None:
        need(len(cfg.prompts) > 0 and all(p.strip() for p in cfg.prompts), "prompts must be non-empty strings")
    check_trackers(cfg.report_to)


# who owns the built-in sections, for the refusal of a section that the chosen world and method do not use
SECTION_OWNERS = {"digits": "the digits world", "lcm": "the lcm world",
                  "ppo": "the policy-gradient methods (rlcm, ddpo, dpok, d3po)", "ddpo": "the ddpo method"}


def changed_fields(section) -> list[str]:
    """The fields of a section object set away from their defaults."""
    try:
        default = type(section)()
    except TypeError:  # a section without defaults for every field: every field is the user's choice
        return [f.name for f in dataclasses.fields(section)]
    return [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]


def owned_sections(*classes) -> set[str]:
    """The sections the classes own, with those of their bases (a subclass of DigitsWorld reads cfg.digits)."""
    return {name for cls in classes for base in getattr(cls, "__mro__", ()) for name in (vars(base).get("config_sections") or {})}


def _check_applies(cfg: TrainConfig, world_cls, method_cls) -> None:
    """A setting that the chosen world, method or finetune mode would ignore is refused, never recorded and
    ignored: a section owned by neither the world nor the method set away from its defaults, LoRA settings
    under finetune full, Jensen–Shannon estimator settings where no Monte Carlo JS estimate is made."""
    owned = owned_sections(world_cls, method_cls)
    for name, section in cfg.sections.items():
        changed = [] if name in owned or not dataclasses.is_dataclass(section) else changed_fields(section)
        need(not changed, f"{', '.join(f'{name}.{f}' for f in changed)}: section {name} belongs to "
             f"{SECTION_OWNERS.get(name, 'another world or method')}, and neither the {cfg.world} world nor the "
             f"{cfg.method} method uses it; drop the setting (or choose a world/method that owns it)")
    default = TrainConfig()
    if cfg.finetune == "full":
        for name in ("lora_rank", "lora_alpha"):
            need(getattr(cfg, name) == getattr(default, name),
                 f"{name} is a LoRA setting, and --finetune full trains every weight (no adapter); drop --{name.replace('_', '-')}")
    uses_js = cfg.divergence == "js" and cfg.beta > 0 and hasattr(method_cls, "divergence_kwargs")
    for name in ("js_estimator", "js_samples"):
        if getattr(cfg, name) != getattr(default, name) and not uses_js:
            why = (f"the divergence is {cfg.divergence}" if cfg.divergence != "js" else "beta = 0 switches the divergence off"
                   if cfg.beta == 0 else f"{cfg.method} computes its Jensen–Shannon term by quadrature (gauss_hermite)")
            raise UserError(f"{name} sets the Monte Carlo Jensen–Shannon estimate, which this run does not make ({why}); "
                            f"drop --{name.replace('_', '-')}")


def validate(cfg: TrainConfig, *, world_cls=None, method_cls=None, check_rewards: bool = True) -> TrainConfig:
    """cfg, checked. world_cls / method_cls: the classes that will run (default: the config's names in the
    registries); check_rewards=False when a ready reward object replaces reward_weights."""
    check_types(cfg)
    world_cls = world_cls or world_class(cfg.world)
    method_cls = method_cls or method_class(cfg.method)
    _check_chain_and_objective(cfg, method_cls)
    _check_optimisation(cfg)
    if check_rewards:
        _check_rewards(cfg, world_cls, method_cls)
    _check_run(cfg)
    # every section's own ranges, whichever world and method run (a bad value is bad input either way)
    for section in cfg.sections.values():
        if hasattr(section, "check"):
            section.check()
    check_finetune(cfg)
    world_cls.check_config(cfg)
    method_cls.check_config(cfg)
    method_cls.check_chain(world_cls.chain_transition(cfg))  # e.g. a deterministic TCD chain has no log-probabilities
    _check_applies(cfg, world_cls, method_cls)
    return cfg
