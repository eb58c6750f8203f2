"""TrainConfig: the common settings of a run, with each world's and method's own settings as sections
(a world or method class's `config_sections`).

Every field carries a one-line reason (its docstring), which `cmalign train --help` shows.
Precedence: dataclass defaults < preset (--preset NAME or --config FILE) < command-line flags.
The flat spellings of earlier releases (`--ppo-epochs`, `--lcm-model`, `digits_resolution:` in YAML,
`TrainConfig(lcm_model=...)`) still work, with a one-line deprecation notice each.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from cmalign.config.types import checked, name_value_pairs
from cmalign.errors import UserError

# --- sections ------------------------------------------------------------------------------------
# The settings a world or a method owns. A world or method class declares `config_sections = {"name": SomeConfig}` (a dataclass whose field
# docstrings are its help, with an optional `check(self)` that refuses bad values in one line). Each
# section becomes a YAML key (`lcm: {model: DIR}`) and `--name.field` flags. The built-in sections are
# listed here as "module:Class" strings of light modules, so that reading a config never imports torch
# or diffusers; a plug-in's sections are added when its class is resolved by name (`add_sections`).
BUILTIN_SECTIONS = {
    "ppo": "cmalign.methods.policy_gradient_config:PPOConfig",
    "ddpo": "cmalign.methods.policy_gradient_config:DDPOConfig",
    "digits": "cmalign.worlds.digits.config:DigitsConfig",
    "lcm": "cmalign.worlds.lcm.config:LCMConfig",
}
_added: dict[str, type] = {}


def _resolve(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def section_classes() -> dict[str, type]:
    """name -> dataclass of every section known in this process (built-ins first)."""
    return {**{name: _resolve(spec) for name, spec in BUILTIN_SECTIONS.items()}, **_added}


def add_sections(owner: type) -> None:
    """Make the sections a world or method class declares known (called when the registry resolves it)."""
    known = section_classes()
    for name, cls in dict(getattr(owner, "config_sections", None) or {}).items():
        where = f"{owner.__module__}.{owner.__qualname__}.config_sections"
        if not (isinstance(name, str) and name.isidentifier()) or name in common_field_names():
            raise UserError(f"{where}: section name {name!r} must be an identifier that is not a common field")
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise UserError(f"{where}[{name!r}] must be a dataclass, got {cls!r}")
        if name in known and known[name] is not cls:
            raise UserError(f"{where}: section {name!r} is owned already by {known[name].__module__}.{known[name].__qualname__}")
        _added[name] = cls


DIVERGENCE_NAMES = ("kl", "js", "hellinger", "fisher", "tv")

# The flat names of earlier releases -> (section, field); accepted, with a deprecation notice, in YAML,
# flags and TrainConfig(...).
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


@dataclass(init=False)
class TrainConfig:
    """The common settings of a run; each world's and method's own settings are sections (config/sections.py),
    read as attributes (`cfg.lcm.model`) and kept in `sections`."""

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
    beta: float = 5.5
    """Divergence weight: 0 lets the policy hack the reward; 5.5 keeps digits legible at the KL of the full regulariser's earlier default (docs/RESULTS.md). d3po: DPO's temperature."""
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
    divergence_steps: Literal["auto", "all"] | int = "auto"
    """Reference steps per batch: all, or N of the K regularised steps drawn per update and weighted to stay unbiased (N reference calls); auto: the method's own (rocm 1, dpok all)."""
    divergence_sampling: Literal["auto", "uniform", "importance"] = "auto"
    """How divergence_steps N draws its steps: uniform (weight K/N) or importance (in proportion to each step's measured divergence, weight 1/(N p_k)); auto: the method's own (rocm importance, dpok uniform)."""
    divergence_fraction: float = 1.0
    """Share of the chains whose divergence is evaluated per update, drawn at random and weighted by its inverse (unbiased)."""
    reward_weights: Annotated[dict[str, float], name_value_pairs(float)] = field(default_factory=lambda: {"proxy": 1.0})
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
    """[FORMAT:]PATH of a prompt set (parti, drawbench, hpsv2, geneval, pickapic, txt: one per line) or a built-in set (varied, simple_animals); overrides prompts."""
    eval_prompts: list[str] | None = None
    """Prompts of the fixed evaluation set (e.g. held-out digit classes); default: the world's evaluation split."""
    eval_prompt_file: str | None = None
    """Held-out evaluation prompts, one per line (UTF-8, # comments): the fixed and final evaluations sample them and
    none of them trains (they are removed from the training prompts); RUN/prompts.json records both sets."""

    # --- models in any world -----------------------------------------------------------------------
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype of the frozen networks (LoRA parameters stay float32)."""
    reward_paths: Annotated[dict[str, str], name_value_pairs(str)] = field(default_factory=dict)
    """Per-reward local folders or hub ids: NAME=PATH for its weights, NAME.COMPONENT=PATH for a part (e.g. aesthetic.clip=/models/clip); see docs/rewards.md."""

    # --- evaluation and logging --------------------------------------------------------------------
    eval_every: int = 25
    """Score the fixed evaluation set (proxy, gold, accuracy) every this many steps."""
    eval_reward_weights: Annotated[dict[str, float], name_value_pairs(float)] = field(default_factory=dict)
    """Held-out rewards never in the loss, each scored alone (weight times score) on the fixed evaluation chains and logged as eval_heldout_NAME, e.g. jpeg_incompressibility=1.0."""
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

    # --- the sections of the worlds and methods (config/sections.py) -------------------------------
    sections: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict, repr=False)
    """Each world's and method's own settings, by section name (read them as cfg.NAME)."""

    def __init__(self, **values):
        sections = dict(values.pop("sections", None) or {})
        known = section_classes()
        for name in [n for n in values if n in known]:
            sections[name] = values.pop(name)
        nested = {name: values.pop(name) for name in list(values) if "." in name}  # "section.field"
        for name in [n for n in values if n in FLAT_ALIASES]:
            deprecated_name(name, ".".join(FLAT_ALIASES[name]))
            nested[".".join(FLAT_ALIASES[name])] = values.pop(name)
        unknown = sorted(set(values) - set(common_field_names()))
        if unknown:
            raise TypeError(f"TrainConfig got unknown field(s) {', '.join(unknown)}; sections: {', '.join(known)}")
        check_argument_types(values)
        for f in dataclasses.fields(TrainConfig):
            if f.name != "sections":
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                setattr(self, f.name, values.get(f.name, default))
        for name, section_cls in known.items():
            sections.setdefault(name, section_cls())
        self.sections = sections
        for key, value in nested.items():
            section, name = key.split(".", 1)
            if section not in sections:
                raise TypeError(f"TrainConfig got unknown section {section!r} in {key!r}; sections: {', '.join(sections)}")
            # a fresh section object: never mutate one that another config shares
            sections[section] = dataclasses.replace(sections[section], **{name: value})

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: a section read as an attribute (cfg.lcm)
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"TrainConfig has no field or section {name!r}")


class ConfigTypeError(UserError, TypeError):
    """A TrainConfig argument of a type its field does not accept (TrainConfig(world=None), method=7)."""


def check_argument_types(values: dict) -> None:
    """Each common field given to TrainConfig(...) has its declared type: one line naming it and what it accepts."""
    for name, value in values.items():
        try:
            checked(TrainConfig, name, value, "TrainConfig: ")
        except UserError as exc:
            raise ConfigTypeError(str(exc)) from None


class DeprecatedName(FutureWarning):
    """A flat name of an earlier release was used; the message names its current spelling."""


def deprecated_name(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecatedName, stacklevel=4)


@functools.cache
def common_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "sections")


def with_changes(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of cfg with top-level fields or "section.field" keys changed (flat aliases: deprecated)."""
    top, nested = {}, {}
    for key, value in changes.items():
        if key in FLAT_ALIASES:
            deprecated_name(key, ".".join(FLAT_ALIASES[key]))
            key = ".".join(FLAT_ALIASES[key])
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    sections = dict(top.pop("sections", cfg.sections))
    for section, values in nested.items():
        if section not in sections:
            raise TypeError(f"unknown config section {section!r}; known: {', '.join(sections)}")
        sections[section] = dataclasses.replace(sections[section], **values)
    return dataclasses.replace(cfg, sections=sections, **top)
