"""Training configuration: common fields at the top level, one section per method family and world,
YAML presets, command-line overrides, typed validation.

Every field carries a one-line reason (its docstring), which `cmalign train --help` shows.
Precedence: dataclass defaults < preset (--preset NAME or --config FILE) < command-line flags.
Sections: `ppo` (rlcm, ddpo, dpok, d3po), `ddpo` (its DDIM chain), `digits`, `lcm`; on the command
line `--ppo.epochs 1`, `--lcm.model DIR`. The flat spellings of earlier releases (`--ppo-epochs`,
`--lcm-model`, `digits_resolution:` in YAML, `TrainConfig(lcm_model=...)`) are accepted as aliases.
`validate()` only checks: it never rewrites the config it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from tyro.constructors import PrimitiveConstructorSpec

from cmalign.errors import UserError

DIVERGENCE_NAMES = ("kl", "js", "hellinger", "fisher", "tv")


def _name_value_pairs(kind):
    """Command-line form of a {name: value} field: `--reward-weights proxy=1.0 classifier=0.5`."""

    def parse(args: list[str]) -> dict:
        out = {}
        for item in args:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ValueError(f"expected NAME=VALUE, got {item!r}")
            out[name] = kind(value)
        return out

    return PrimitiveConstructorSpec(
        nargs="*", metavar="NAME=VALUE", instance_from_str=parse, is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda d: [f"{k}={v}" for k, v in d.items()],
    )


# --- sections: each owned by its world or method ------------------------------------------------------
from cmalign.methods.policy_gradient_config import DDPOConfig, PPOConfig  # noqa: E402
from cmalign.worlds.digits.config import DigitsConfig  # noqa: E402
from cmalign.worlds.lcm.config import LCMConfig  # noqa: E402








SECTIONS = {"ppo": PPOConfig, "ddpo": DDPOConfig, "digits": DigitsConfig, "lcm": LCMConfig}

# The flat names of earlier releases -> (section, field); accepted in YAML, flags and TrainConfig(...).
FLAT_ALIASES = {
    "ppo_clip": ("ppo", "clip"), "ppo_epochs": ("ppo", "epochs"), "ppo_minibatches": ("ppo", "minibatches"),
    "adv_clip": ("ppo", "adv_clip"), "stat_buffer": ("ppo", "stat_buffer"), "stat_min_count": ("ppo", "stat_min_count"),
    "ddpo_steps": ("ddpo", "steps"), "ddim_eta": ("ddpo", "eta"),
    "digits_resolution": ("digits", "resolution"), "digits_model_size": ("digits", "model_size"),
    "proxy_pairs": ("digits", "proxy_pairs"), "pretrain_teacher_steps": ("digits", "pretrain_teacher_steps"),
    "pretrain_distill_steps": ("digits", "pretrain_distill_steps"), "proxy_path": ("digits", "proxy_path"),
    "digits_grid": ("digits", "grid"),
    "lcm_model": ("lcm", "model"), "lcm_lora": ("lcm", "lora"), "lcm_lora_mode": ("lcm", "lora_mode"),
    "guidance_scale": ("lcm", "guidance_scale"), "resolution": ("lcm", "resolution"),
    "lora_targets": ("lcm", "lora_targets"), "heldout_fraction": ("lcm", "heldout_fraction"),
    "lcm_unet": ("lcm", "unet"), "lcm_lora_weight_name": ("lcm", "lora_weight_name"), "scheduler": ("lcm", "scheduler"),
    "tcd_gamma": ("lcm", "tcd_gamma"), "vae_checkpointing": ("lcm", "vae_checkpointing"),
}


@dataclass
class TrainConfig:
    # --- what is trained ---------------------------------------------------------------------------
    world: str = "digits"
    """Model world: digits (embedded, CPU, minutes), lcm (diffusers latent consistency models), or a registered plug-in."""
    method: str = "rocm"
    """Alignment method: rocm (reward gradient through the chain) | rlcm | ddpo | draft | dpok | d3po (baselines) | a registered plug-in."""
    seed: int = 0
    """Seed of the adapter initialisation, prompts and noise (per rank offset when distributed)."""
    output_dir: str | None = None
    """Run directory; default runs/<method>-<world>-<timestamp>."""

    # --- the sampling chain ------------------------------------------------------------------------
    num_steps: int = 4
    """K, the consistency sampling steps (LCM skipping grid over 50 original steps)."""
    final_step: Literal["floor", "skip"] = "floor"
    """floor: regularise the noiseless last step as N(m_K, (1 - abar_K) I); skip: leave it free."""
    backprop_steps: int | None = None
    """Back-propagate through the last this-many steps only (DRaFT-K); None means all K."""
    grad_checkpointing: bool | None = None
    """Recompute each network call in the backward pass (less memory, more time); None: on for lcm."""

    # --- the objective -----------------------------------------------------------------------------
    beta: float = 6.0
    """Divergence weight: 0 lets the policy hack the reward; 6 keeps digits legible (docs/RESULTS.md). d3po: DPO's temperature."""
    divergence: str = "kl"
    """Per-step f-divergence to the reference: kl | js | hellinger | fisher | tv."""
    divergence_reduction: Literal["per_dim", "joint"] = "per_dim"
    """per_dim: mean over coordinates (beta resolution-free); joint: exact d-dim divergence."""
    js_estimator: Literal["gauss_hermite", "mc"] = "gauss_hermite"
    """Jensen–Shannon by exact quadrature or by Monte Carlo (the paper's estimator)."""
    js_samples: int = 16
    """Monte Carlo draws per evaluation when js_estimator is mc."""
    divergence_grad: Literal["full", "stopgrad_ref"] = "full"
    """full: exact gradient (reference on live states); stopgrad_ref: cheaper, biased."""
    divergence_steps: Literal["all"] | int = "all"
    """Reference steps per batch: all, or N of the K regularised steps drawn per update, weighted K/N (unbiased, N reference calls)."""
    divergence_fraction: float = 1.0
    """Share of the chains whose divergence is evaluated per update, drawn at random and weighted by its inverse (unbiased)."""
    reward_weights: Annotated[dict[str, float], _name_value_pairs(float)] = field(default_factory=lambda: {"proxy": 1.0})
    """Training reward as a weighted sum of rewards: registered names or package.module:attribute, e.g. proxy=1.0 mypkg.scores:sharpness=0.5."""
    reward_scale: float = 1.0
    """Multiplies the reward in the loss (the divergence keeps weight beta)."""
    clamp: Literal["hard", "straight_through", "soft"] = "hard"
    """How images are clamped to [0, 1] on the reward's gradient path (scores always use hard)."""
    score_baseline: Literal["loo", "none"] = "loo"
    """rocm with non-differentiable reward terms (score-function estimator): loo subtracts the other same-prompt chains' mean reward (unbiased, lower variance); none: no baseline."""


    # --- optimisation ------------------------------------------------------------------------------
    steps: int = 400
    """Optimiser updates."""
    max_train_seconds: float | None = None
    """Stop earlier once this many seconds of training (evaluation excluded) are spent: a wall-clock budget."""
    batch_size: int = 32
    """Prompts (and chains) per update and process."""
    lr: float = 1e-4
    """AdamW learning rate of the adapter (1e-3 hacks the digits proxy within ~20 steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0 keeps the objective exactly the one above)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    finetune: Literal["lora", "full"] = "lora"
    """lora: train a LoRA adapter (reference = adapter off); full: train every network weight against a frozen copy, sharded with FSDP2 over several ranks (docs/scaling.md)."""
    reference_offload: bool = False
    """finetune full: keep the frozen reference copy's weights on the CPU (FSDP CPU offload when sharded)."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 8.0
    """LoRA alpha (scale alpha / rank)."""

    # --- prompts -----------------------------------------------------------------------------------
    prompts: list[str] | None = None
    """Training prompts; default: the world's own set (all ten digit classes for digits)."""
    prompt_file: str | None = None
    """A UTF-8 text file with one prompt per line (overrides prompts)."""
    eval_prompts: list[str] | None = None
    """Prompts of the fixed evaluation set (e.g. held-out digit classes); default: the world's evaluation split."""



    # --- sections: each method family and world owns its settings ----------------------------------
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)

    # --- models in any world -----------------------------------------------------------------------
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype of the frozen networks (LoRA parameters stay float32)."""
    reward_paths: Annotated[dict[str, str], _name_value_pairs(str)] = field(default_factory=dict)
    """Per-reward local folders or hub ids: NAME=PATH for its weights, NAME.COMPONENT=PATH for a part (e.g. aesthetic.clip=/models/clip); see docs/rewards.md."""

    # --- evaluation and logging --------------------------------------------------------------------
    eval_every: int = 25
    """Score the fixed evaluation set (proxy, gold, accuracy) every this many steps."""
    eval_size: int = 200
    """Fixed evaluation chains (prompts x seeds), identical at every evaluation."""
    grid_every: int = 100
    """Save a sample grid of the fixed evaluation prompts every this many steps."""
    final_eval_size: int = 500
    """Fresh held-out samples scored for the base and the tuned model at the end."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    threads: int | None = None
    """torch CPU threads; default: torch's own choice."""
    report_to: str = "tensorboard"
    """Experiment tracker(s) through accelerate: tensorboard | wandb | trackio | none (comma-separated for several)."""

    # --- reliability -------------------------------------------------------------------------------
    checkpoint_every: int = 100
    """Write an exact-resume checkpoint (checkpoints/step_XXXXXX/) every this many steps (0: never)."""
    keep_checkpoints: int = 2
    """Keep the newest this-many checkpoints; older ones are deleted."""
    ema_decay: float | None = None
    """EMA decay of the adapter (e.g. 0.99), used for evaluation and the final adapter; None: off."""
    max_bad_steps: int = 5
    """Stop after this many updates in a row skipped for NaN/inf reward, loss or gradients."""


_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_aliases(self, *args, **kwargs):
    """TrainConfig(lcm_model=...) and the other flat names of earlier releases set their section's field."""
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k in FLAT_ALIASES}
    _dataclass_init(self, *args, **kwargs)
    for key, value in flat.items():
        section, name = FLAT_ALIASES[key]
        # a fresh section object: never mutate one that another config shares (dataclasses.replace passes it on)
        setattr(self, section, dataclasses.replace(getattr(self, section), **{name: value}))


TrainConfig.__init__ = _init_with_aliases


def with_changes(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of cfg with top-level fields, flat aliases or "section.field" keys changed."""
    top, nested = {}, {}
    for key, value in changes.items():
        if key in FLAT_ALIASES:
            key = ".".join(FLAT_ALIASES[key])
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in nested.items():
        top[section] = dataclasses.replace(top.get(section, getattr(cfg, section)), **values)
    return dataclasses.replace(cfg, **top)


# --- field types: checked for every value, whether it came from YAML, flags or Python ---------------
@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _describe(tp) -> str:
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of name: {_describe(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _strip(tp):
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _convert(value, tp):
    """value as type tp (ints become floats where a float is wanted), or ValueError."""
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except ValueError:
                pass
        raise ValueError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [_convert(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ValueError
    return value


def _checked(cls, name: str, value, where: str):
    try:
        return _convert(value, _hints(cls)[name])
    except ValueError:
        raise UserError(f"{where}{name} must be {_describe(_hints(cls)[name])}, got {value!r}") from None


# --- YAML -------------------------------------------------------------------------------------------
def _preset_text(name: str) -> str:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {name} does not exist")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {name} is unreadable ({type(exc).__name__})") from None
    ref = resources.files("cmalign") / "presets" / f"{name}.yaml"
    if not ref.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return ref.read_text(encoding="utf-8")


def available_presets() -> list[str]:
    folder = resources.files("cmalign") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply a {field: value} mapping (from YAML) onto a config. Keys are top-level fields, sections
    ({ppo: {epochs: 1}}), "section.field" or the flat aliases; unknown keys and ill-typed values are refused."""
    base = base or TrainConfig()
    if not isinstance(values, dict):
        raise UserError(f"{source} must be a mapping of field: value")
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    changes, unknown = {}, []
    for key, value in values.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):
            for name, v in value.items():
                changes[f"{key}.{name}"] = v
        elif key in FLAT_ALIASES:
            changes[".".join(FLAT_ALIASES[key])] = value
        elif key in top and key not in SECTIONS:
            changes[key] = value
        elif "." in key:
            changes[key] = value
        else:
            unknown.append(key)
    for key, value in list(changes.items()):
        if "." in key:
            section, name = key.split(".", 1)
            cls = SECTIONS.get(section)
            if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
                unknown.append(key)
                continue
            changes[key] = _checked(cls, name, value, f"{source}: {section}.")
        else:
            changes[key] = _checked(TrainConfig, key, value, f"{source}: ")
    if unknown:
        raise UserError(f"{source}: unknown config key(s) {', '.join(sorted(unknown))}")
    return with_changes(base, **changes)


def load_preset(name: str, base: TrainConfig | None = None) -> TrainConfig:
    try:
        values = yaml.safe_load(_preset_text(name)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_mapping(values, base, source=name)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_items(values: dict[str, Any]) -> dict[str, Any]:
    """{"ppo.epochs": 2, "beta": 6.0, ...} of a config dict (nested or with flat aliases, as stored)."""
    out = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in FLAT_ALIASES:
            out[".".join(FLAT_ALIASES[key])] = value
        else:
            out[key] = value
    return out


def config_diff(cfg: TrainConfig, stored: dict | str, ignore=()) -> list[str]:
    """The fields (as "section.field" for sections) in which cfg differs from a stored config."""
    if isinstance(stored, str):
        try:
            stored = yaml.safe_load(stored) or {}
        except yaml.YAMLError:
            return ["config.yaml (unreadable)"]
    if not isinstance(stored, dict):
        return ["config.yaml (not a mapping)"]
    now, then = flat_items(to_dict(cfg)), flat_items(stored)
    defaults = flat_items(to_dict(TrainConfig()))
    # a field missing from an older stored config counts as its default
    return sorted(k for k in set(now) | set(then)
                  if k not in ignore and now.get(k, defaults.get(k)) != then.get(k, defaults.get(k)))


# --- command line -----------------------------------------------------------------------------------
def cli_aliases(args: list[str]) -> list[str]:
    """Rewrite the flat flags of earlier releases (--lcm-model X, --ppo_epochs=1) to their sections' (--lcm.model)."""
    out = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            flag, sep, value = a[2:].partition("=")
            key = flag.replace("-", "_")
            if key in FLAT_ALIASES:
                section, name = FLAT_ALIASES[key]
                a = f"--{section}.{name.replace('_', '-')}" + (sep + value if sep else "")
        out.append(a)
    return out


# --- validation -------------------------------------------------------------------------------------
def _check_types(obj, cls, where: str = "") -> None:
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if f.name in SECTIONS and cls is TrainConfig:
            if not isinstance(value, SECTIONS[f.name]):
                raise UserError(f"{f.name} must be a {SECTIONS[f.name].__name__}, got {type(value).__name__}")
            _check_types(value, SECTIONS[f.name], f"{f.name}.")
            continue
        _checked(cls, f.name, value, where)
        for x in _floats(value):
            if not math.isfinite(x):
                raise UserError(f"{where}{f.name} must be finite, got {value!r}")


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats(v)


MAX_BATCH = 1 << 16  # beyond this no world here can allocate a chain; refuse before an allocator trace


def validate(cfg: TrainConfig, *, world_cls=None, method_cls=None, check_rewards: bool = True) -> TrainConfig:
    """Refuse impossible settings with one clear line each (UserError); the config is not changed.
    Common fields are checked here; the world's and the method's own checks come from their classes,
    so that a setting of one method (e.g. ppo.minibatches) never refuses another method's run.
    world_cls / method_cls: the classes that will run (default: the config's names in the registries);
    check_rewards=False when a ready reward object replaces reward_weights."""
    from cmalign.methods.registry import method_class
    from cmalign.worlds.registry import world_class

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    if not isinstance(cfg, TrainConfig):
        raise UserError(f"expected a TrainConfig, got {type(cfg).__name__}")
    _check_types(cfg, TrainConfig)
    world_cls = world_cls or world_class(cfg.world)
    method_cls = method_cls or method_class(cfg.method)
    need(cfg.divergence in DIVERGENCE_NAMES, f"unknown divergence {cfg.divergence!r}; expected one of {', '.join(DIVERGENCE_NAMES)}")
    need(cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}")
    need(cfg.num_steps >= 1, f"num_steps (K) must be >= 1, got {cfg.num_steps}")
    need(cfg.num_steps <= 50, f"num_steps (K) must be <= 50 (the LCM grid), got {cfg.num_steps}")
    if cfg.backprop_steps is not None:
        need(1 <= cfg.backprop_steps <= cfg.num_steps, f"backprop_steps must be in [1, K={cfg.num_steps}], got {cfg.backprop_steps}")
    need(cfg.reward_scale > 0, f"reward_scale must be > 0, got {cfg.reward_scale}")
    need(cfg.js_samples >= 1, f"js_samples must be >= 1, got {cfg.js_samples}")
    if cfg.divergence_steps != "all" or cfg.divergence_fraction != 1.0:
        terms = method_cls.chain_length(cfg) - (cfg.final_step == "skip")
        need(cfg.divergence_steps == "all" or 1 <= cfg.divergence_steps <= terms,
             f"divergence_steps must be all or in [1, {terms}] (the regularised steps of K={method_cls.chain_length(cfg)}, "
             f"final_step {cfg.final_step}), got {cfg.divergence_steps}")
        need(0 < cfg.divergence_fraction <= 1, f"divergence_fraction must be in (0, 1], got {cfg.divergence_fraction}")
        need(cfg.beta > 0, "divergence_steps / divergence_fraction subsample the divergence term, which beta = 0 switches off")
        from cmalign.methods.policy_gradient import Dpok
        from cmalign.methods.rocm import Rocm

        need(issubclass(method_cls, (Rocm, Dpok)),
             f"divergence_steps / divergence_fraction subsample a per-step divergence term, which {cfg.method} does not have (rocm, dpok)")
    need(1 <= cfg.batch_size <= MAX_BATCH, f"batch_size must be >= 1 (and at most {MAX_BATCH}), got {cfg.batch_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {cfg.grad_clip}")
    need(cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}")
    need(cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    need(cfg.eval_every >= 1 and cfg.grid_every >= 1, "eval_every and grid_every must be >= 1")
    need(1 <= cfg.eval_size <= MAX_BATCH, f"eval_size must be >= 1 (and at most {MAX_BATCH}), got {cfg.eval_size}")
    need(0 <= cfg.final_eval_size <= MAX_BATCH, f"final_eval_size must be >= 0 (and at most {MAX_BATCH}), got {cfg.final_eval_size}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    if check_rewards:
        from cmalign.rewards.registry import check_reward_names

        need(bool(cfg.reward_weights), "reward_weights is empty: name at least one reward")
        need(all(n.strip() for n in cfg.reward_weights), "reward_weights has an empty reward name")
        check_reward_names(cfg, world_cls, method_cls)  # before any model is built or pretrained
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {cfg.max_bad_steps}")
    if cfg.ema_decay is not None:
        need(0 < cfg.ema_decay < 1, f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.max_train_seconds is not None:
        need(cfg.max_train_seconds > 0, f"max_train_seconds must be > 0, got {cfg.max_train_seconds}")
    if cfg.eval_prompts is not None:
        need(len(cfg.eval_prompts) > 0 and all(p.strip() for p in cfg.eval_prompts), "eval_prompts must be non-empty strings")
    if cfg.prompts is not None:
        need(len(cfg.prompts) > 0 and all(p.strip() for p in cfg.prompts), "prompts must be non-empty strings")
    from cmalign.training.tracking import check_trackers

    check_trackers(cfg.report_to)
    # the sections' own ranges, whichever world and method run (a bad value is bad input either way)
    p, d = cfg.ppo, cfg.ddpo
    need(p.clip > 0 and p.epochs >= 1 and p.minibatches >= 1, "ppo.clip must be > 0, ppo.epochs and ppo.minibatches >= 1")
    need(p.adv_clip > 0 and p.stat_buffer >= 0 and p.stat_min_count >= 1, "ppo.adv_clip must be > 0, ppo.stat_buffer >= 0, ppo.stat_min_count >= 1")
    need(2 <= d.steps <= 1000 and d.eta >= 0, "ddpo.steps must be in [2, 1000] and ddpo.eta >= 0")
    need(cfg.digits.resolution in (8, 16), f"digits.resolution must be 8 or 16, got {cfg.digits.resolution}")
    need(cfg.digits.grid in (1, 2, 3, 4), f"digits.grid must be 1, 2, 3 or 4, got {cfg.digits.grid}")
    need(cfg.digits.grid == 1 or cfg.digits.resolution == 8,
         f"digits.grid {cfg.digits.grid} is a grid of 8x8 digits: digits.resolution must stay 8, got {cfg.digits.resolution}")
    need(cfg.digits.proxy_pairs >= 10, f"digits.proxy_pairs must be >= 10, got {cfg.digits.proxy_pairs}")
    for name in ("pretrain_teacher_steps", "pretrain_distill_steps"):
        value = getattr(cfg.digits, name)
        need(value is None or value >= 1, f"digits.{name} must be >= 1, got {value}")
    need(cfg.lcm.resolution >= 8 and cfg.lcm.resolution % 8 == 0, f"lcm.resolution must be a positive multiple of 8, got {cfg.lcm.resolution}")
    need(0 <= cfg.lcm.heldout_fraction < 1, f"lcm.heldout_fraction must be in [0, 1), got {cfg.lcm.heldout_fraction}")
    need(bool(cfg.lcm.lora_targets), "lcm.lora_targets is empty")
    from cmalign.training.full_finetune import check_config as check_finetune

    check_finetune(cfg)
    world_cls.check_config(cfg)
    method_cls.check_config(cfg)
    return cfg
