"""Training configuration: one dataclass, YAML presets, command-line overrides, validation.

Every field carries a one-line reason (its docstring), which `cmalign train --help` shows.
Precedence: dataclass defaults < preset (--preset NAME or --config FILE) < command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from tyro.constructors import PrimitiveConstructorSpec

from .errors import UserError

WORLDS = ("digits", "lcm")
METHODS = ("rocm", "rlcm", "ddpo", "draft", "dpok", "d3po")
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


@dataclass
class TrainConfig:
    # --- what is trained ---------------------------------------------------------------------------
    world: str = "digits"
    """Model world: digits (embedded, CPU, minutes) or lcm (diffusers latent consistency models)."""
    method: str = "rocm"
    """Alignment method: rocm (reward gradient through the chain) | rlcm | ddpo | draft | dpok | d3po (baselines)."""
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
    reward_weights: Annotated[dict[str, float], _name_value_pairs(float)] = field(default_factory=lambda: {"proxy": 1.0})
    """Training reward as a weighted sum of registered rewards, e.g. proxy=1.0 classifier=0.5."""
    reward_scale: float = 1.0
    """Multiplies the reward in the loss (the divergence keeps weight beta)."""
    clamp: Literal["hard", "straight_through", "soft"] = "hard"
    """How images are clamped to [0, 1] on the reward's gradient path (scores always use hard)."""

    # --- policy-gradient baselines (rlcm, ddpo, dpok, d3po) and draft -----------------------------------
    ppo_clip: float = 1e-4
    """PPO ratio clip range epsilon (RLCM and DDPO default)."""
    ppo_epochs: int = 2
    """PPO inner epochs over each batch of rollouts."""
    ppo_minibatches: int = 2
    """Minibatches per inner epoch (one optimiser update each)."""
    adv_clip: float = 10.0
    """Clip normalised advantages to [-adv_clip, adv_clip]."""
    stat_buffer: int = 32
    """Per-prompt reward buffer for advantage normalisation (0: batch statistics only)."""
    stat_min_count: int = 16
    """Rewards a prompt needs in its buffer before its own statistics replace the batch's."""
    ddpo_steps: int = 20
    """DDIM steps of the ddpo baseline on the digits DDPM teacher (num_steps is set to it)."""
    ddim_eta: float = 1.0
    """DDIM eta of the ddpo chain (1: DDPM-like stochastic steps, as DDPO)."""

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

    # --- digits world ------------------------------------------------------------------------------
    digits_resolution: int = 8
    """Image side of the digits world (8, or 16 by bilinear upsampling)."""
    digits_model_size: Literal["base", "tiny"] = "base"
    """Base UNet size: base (1.1M parameters) or tiny (tests)."""
    proxy_pairs: int = 2000
    """Gold-labelled preference pairs the digits proxy reward model is trained on."""
    pretrain_teacher_steps: int | None = None
    """Override the DDPM teacher steps if pretraining runs (tests use few)."""
    pretrain_distill_steps: int | None = None
    """Override the distillation steps if pretraining runs (tests use few)."""

    proxy_path: str | None = None
    """Folder of a proxy trained by `cmalign reward-model train`; default: the cached one."""

    # --- lcm world ---------------------------------------------------------------------------------
    lcm_model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """Hub id or local folder of a diffusers latent consistency model (or an SD-1.5 base with lcm_lora)."""
    lcm_lora: str | None = None
    """Hub id or folder of an LCM-LoRA (e.g. latent-consistency/lcm-lora-sdv1-5) applied to lcm_model."""
    lcm_lora_mode: Literal["fuse", "stack"] = "fuse"
    """fuse the LCM-LoRA into the base weights, or stack it under the trained adapter."""
    guidance_scale: float = 8.0
    """LCM guidance-embedding scale w (the pipeline embeds w - 1)."""
    resolution: int = 512
    """Image side in pixels for the lcm world."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype of the frozen networks (LoRA parameters stay float32)."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names the lcm world's LoRA adapter attaches to (attention projections by default)."""
    reward_paths: Annotated[dict[str, str], _name_value_pairs(str)] = field(default_factory=dict)
    """Per-reward local folder or hub id overriding the default weights, e.g. pickscore=/models/pick."""
    heldout_fraction: float = 0.2
    """Share of prompts held out from training for evaluation (lcm world)."""

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

    # --- reliability -------------------------------------------------------------------------------
    checkpoint_every: int = 100
    """Write an exact-resume checkpoint (checkpoints/step_XXXXXX/) every this many steps (0: never)."""
    keep_checkpoints: int = 2
    """Keep the newest this-many checkpoints; older ones are deleted."""
    ema_decay: float | None = None
    """EMA decay of the adapter (e.g. 0.99), used for evaluation and the final adapter; None: off."""
    max_bad_steps: int = 5
    """Stop after this many updates in a row skipped for NaN/inf reward, loss or gradients."""


def _preset_text(name: str) -> str:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {name} does not exist")
        return path.read_text(encoding="utf-8")
    ref = resources.files("cmalign") / "presets" / f"{name}.yaml"
    if not ref.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return ref.read_text(encoding="utf-8")


def available_presets() -> list[str]:
    folder = resources.files("cmalign") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply a {field: value} mapping (from YAML) onto a config; unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown config key(s) {', '.join(unknown)}")
    return dataclasses.replace(base or TrainConfig(), **values)


def load_preset(name: str) -> TrainConfig:
    try:
        values = yaml.safe_load(_preset_text(name)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {name} must be a mapping of field: value")
    return from_mapping(values, source=name)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse impossible settings with one clear line each (UserError)."""
    from .methods import METHOD_NAMES

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(cfg.world in WORLDS, f"unknown world {cfg.world!r}; expected one of {', '.join(WORLDS)}")
    need(cfg.method in METHOD_NAMES, f"unknown method {cfg.method!r}; expected one of {', '.join(METHOD_NAMES)}")
    need(cfg.divergence in DIVERGENCE_NAMES, f"unknown divergence {cfg.divergence!r}; expected one of {', '.join(DIVERGENCE_NAMES)}")
    need(cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}")
    need(cfg.num_steps >= 1, f"num_steps (K) must be >= 1, got {cfg.num_steps}")
    need(cfg.num_steps <= 50, f"num_steps (K) must be <= 50 (the LCM grid), got {cfg.num_steps}")
    if cfg.backprop_steps is not None:
        need(1 <= cfg.backprop_steps <= cfg.num_steps, f"backprop_steps must be in [1, K={cfg.num_steps}], got {cfg.backprop_steps}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")  # before ppo_minibatches <= batch_size
    need(cfg.ppo_clip > 0 and cfg.ppo_epochs >= 1 and cfg.ppo_minibatches >= 1, "ppo_clip must be > 0, ppo_epochs and ppo_minibatches >= 1")
    need(cfg.ppo_minibatches <= cfg.batch_size, f"ppo_minibatches ({cfg.ppo_minibatches}) must be <= batch_size ({cfg.batch_size})")
    need(cfg.adv_clip > 0 and cfg.stat_buffer >= 0 and cfg.stat_min_count >= 1, "adv_clip must be > 0, stat_buffer >= 0, stat_min_count >= 1")
    need(2 <= cfg.ddpo_steps <= 1000 and 0 <= cfg.ddim_eta, "ddpo_steps must be in [2, 1000] and ddim_eta >= 0")
    if cfg.method == "d3po":
        need(cfg.batch_size >= 2 and cfg.batch_size % 2 == 0, f"d3po trains on pairs: batch_size must be even and >= 2, got {cfg.batch_size}")
        need(cfg.beta > 0, f"d3po needs beta > 0 (DPO's temperature), got {cfg.beta}")
    if cfg.method == "ddpo":
        cfg.num_steps = cfg.ddpo_steps  # the DDIM chain length; everything downstream reads num_steps
    if cfg.method == "draft":  # DRaFT-K / AlignProp: no divergence; DRaFT-1 unless backprop_steps says otherwise
        cfg.beta = 0.0
        cfg.backprop_steps = 1 if cfg.backprop_steps is None else cfg.backprop_steps
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0, got {cfg.grad_clip}")
    need(cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}")
    need(cfg.eval_every >= 1 and cfg.grid_every >= 1, "eval_every and grid_every must be >= 1")
    need(cfg.eval_size >= 1 and cfg.final_eval_size >= 0, "eval_size must be >= 1 and final_eval_size >= 0")
    need(cfg.js_samples >= 1, f"js_samples must be >= 1, got {cfg.js_samples}")
    need(cfg.digits_resolution in (8, 16), f"digits_resolution must be 8 or 16, got {cfg.digits_resolution}")
    need(cfg.proxy_pairs >= 10, f"proxy_pairs must be >= 10, got {cfg.proxy_pairs}")
    need(bool(cfg.reward_weights), "reward_weights is empty: name at least one reward")
    need("gold" not in cfg.reward_weights,
         "gold is the evaluation stand-in for human raters and never a training reward; train on proxy")
    from .rewards import available

    known = available(cfg.world)  # checked before any model is built or pretrained
    unknown = [n for n in cfg.reward_weights if n not in known]
    need(not unknown, f"unknown reward {', '.join(map(repr, unknown))} for the {cfg.world} world; available: {', '.join(known)}")
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
    return cfg
