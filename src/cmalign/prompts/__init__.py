"""Prompt sets: the bundled files beside this module and users' own prompt files (one per line)."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from cmalign.errors import UserError
from cmalign.prompts.sets import FORMATS as PROMPT_FORMATS, PromptSet, load_prompts  # noqa: F401  (standard evaluation sets)

BUNDLED = ("simple_animals", "varied")


def _parse(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def bundled_prompts(name: str) -> list[str]:
    """A prompt set shipped with cmalign: simple_animals (DDPO-style) or varied."""
    ref = resources.files(__package__) / f"{name}.txt"
    if name not in BUNDLED or not ref.is_file():
        raise UserError(f"unknown bundled prompt set {name!r}; available: {', '.join(BUNDLED)}")
    return _parse(ref.read_text(encoding="utf-8"))


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines and # comments ignored)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        prompts = _parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (expected one prompt per line)")
    return prompts


def split_prompts(prompts: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) by a seeded shuffle, so the split is the same on every run and machine."""
    if not 0 <= heldout_fraction < 1:
        raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    unique = list(dict.fromkeys(prompts))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(unique) - 1, round(heldout_fraction * len(unique)))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [unique[i] for i in train], [unique[i] for i in heldout]


def training_prompts(cfg, world) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): the world's default split unless the config names prompts."""
    if cfg.prompt_file or cfg.prompts:
        train = list(load_prompts(cfg.prompt_file).prompts) if cfg.prompt_file else list(cfg.prompts)
        world.check_prompts(train)  # fail early on bad prompts
        evaluation = train
    else:
        train, evaluation = world.default_prompts()
    if cfg.eval_prompts:
        evaluation = list(cfg.eval_prompts)
        world.check_prompts(evaluation)
    return train, evaluation
