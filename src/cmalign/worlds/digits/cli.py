"""The digits world's commands: `cmalign pretrain digits` and `cmalign reward-model train` (cmalign.cli
dispatches here through WORLD_COMMANDS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmalign.cli import parse
from cmalign.config import TrainConfig, with_changes
from cmalign.errors import UserError
from cmalign.rewards.bradley_terry import PreferencePairs
from cmalign.training.run_dir import ensure_writable_dir, writing
from cmalign.worlds.digits import cache
from cmalign.worlds.digits.factory import digits_world_class
from cmalign.worlds.digits.proxy import fit_proxy, make_gold_pairs, save_proxy


@dataclass
class PretrainArgs:
    resolution: int = 8
    """Image side (8 or 16)."""
    model_size: Literal["base", "tiny"] = "base"
    """UNet size."""
    teacher_steps: int | None = None
    """Override the teacher's updates."""
    distill_steps: int | None = None
    """Override the distillation updates."""
    force: bool = False
    """Rebuild even if the cache holds these models."""
    grid: int = 1
    """Compositional digits: an N x N grid of 8x8 digits (2, 3 or 4; the grid's own recipe, worlds/digits/grid.py)."""


def pretrain(args: list[str]) -> int:
    """cmalign pretrain digits [options]: build the base models of a recipe into the cache."""
    if not args or args[0] != "digits":
        raise UserError("usage: cmalign pretrain digits [--resolution 8] [--model-size base] [--force]")
    a = parse(PretrainArgs, args[1:], "cmalign pretrain digits")
    if a.resolution not in (8, 16):
        raise UserError(f"resolution must be 8 or 16, got {a.resolution}")
    overrides = {k: v for k, v in (("teacher_steps", a.teacher_steps), ("distill_steps", a.distill_steps)) if v is not None}
    for name, value in overrides.items():
        if value < 1:
            raise UserError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    if a.grid != 1 and a.resolution != 8:
        raise UserError(f"--grid {a.grid} is a grid of 8x8 digits: --resolution must stay 8, got {a.resolution}")
    cfg = digits_world_class(a.grid).pretrain_recipe(a.resolution, a.model_size, a.grid, **overrides)
    folder = cache.build_and_cache(cfg, force=a.force)
    print(f"cmalign: digits base models in {folder}")
    return 0


@dataclass
class RewardModelArgs:
    out: str
    """Folder to write the reward model (proxy.safetensors + manifest.json)."""
    pairs: str | None = None
    """A .npz of preference pairs (images_a, images_b, prompts, prefer_a); default: gold-labelled base samples."""
    num_pairs: int = 2000
    """Gold-labelled pairs to generate when no file is given."""
    resolution: int = 8
    """Digits resolution."""
    seed: int = 0
    """Seed of pair generation and training."""


def reward_model(args: list[str]) -> int:
    """cmalign reward-model train --out DIR: a Bradley–Terry digits proxy from a pairs file or gold-labelled samples."""
    if not args or args[0] != "train":
        raise UserError("usage: cmalign reward-model train --out DIR [--pairs FILE.npz] [--num-pairs N]")
    a = parse(RewardModelArgs, args[1:], "cmalign reward-model train")
    out = Path(a.out)
    if (out / "proxy.safetensors").exists():
        raise UserError(f"{out} already holds a reward model; choose another --out")
    ensure_writable_dir(out, "--out folder")  # before the pairs are generated and the model fitted
    if a.pairs:
        pairs = PreferencePairs.load(a.pairs)
        source = str(a.pairs)
    else:
        if a.num_pairs < 10:
            raise UserError(f"num_pairs must be >= 10, got {a.num_pairs}")
        world = digits_world_class(1).from_config(with_changes(TrainConfig(), **{"digits.resolution": a.resolution}), lora=False)
        pairs, _ = make_gold_pairs(world, a.num_pairs, seed=a.seed)
        source = f"{a.num_pairs} gold-labelled base-model pairs"
    if pairs.images_a.shape[1:] != (1, a.resolution, a.resolution):
        raise UserError(f"pairs hold images of shape {tuple(pairs.images_a.shape[1:])}; expected (1, {a.resolution}, {a.resolution})")
    model, stats = fit_proxy(pairs, a.resolution, a.seed)
    with writing("the reward model into", out):
        save_proxy(model, out, {"source": source, "num_pairs": len(pairs), "seed": a.seed, "stats": stats})
    print(f"cmalign: reward model in {out} (held-out pair accuracy {stats['val_accuracy']:.3f}); "
          f"use it with `cmalign train --digits.proxy-path {out}`")
    return 0
