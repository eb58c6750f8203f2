"""Prompt sets: the bundled files beside this module and users' own prompt files (one per line)."""

from __future__ import annotations

import random
from dataclasses import dataclass
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


SPLIT_SEED = 0  # the held-out split of a prompt file: the same on every run, seed and machine


@dataclass(frozen=True)
class PromptSplit:
    """A run's prompts: what trains, what the fixed and final evaluations sample, and whether those are
    held out (no evaluation prompt is a training prompt); `how` says in words where both came from."""

    train: list[str]
    eval: list[str]
    held_out: bool
    how: str

    def as_json(self) -> dict:
        """RUN/prompts.json."""
        return {"train": self.train, "eval": self.eval, "held_out": self.held_out, "how": self.how}


def prompt_split(cfg, world) -> PromptSplit:
    """The run's prompts, in this order of precedence:

    - `eval_prompt_file`: its prompts evaluate, and are removed from the training prompts (held out);
    - `eval_prompts`: evaluate as given (held out when none of them trains);
    - `prompt_file` alone: the world's `heldout_fraction` of its distinct prompts (a seeded shuffle,
      SPLIT_SEED) evaluates and does not train (lcm: lcm.heldout_fraction); a world without one (digits,
      whose prompts are the classes) or a file of one prompt evaluates on its training prompts;
    - `prompts` alone: they train and evaluate;
    - nothing: the world's default split."""
    if cfg.prompt_file or cfg.prompts:
        train = list(load_prompts(cfg.prompt_file).prompts) if cfg.prompt_file else list(cfg.prompts)
        source = f"prompt file {cfg.prompt_file}" if cfg.prompt_file else "--prompts"
        world.check_prompts(train)  # fail early on bad prompts
        evaluation, how = train, f"training prompts from {source}; evaluation on the same prompts"
        fraction = float(getattr(world, "heldout_fraction", 0.0) or 0.0)
        if cfg.prompt_file and fraction > 0 and not (cfg.eval_prompt_file or cfg.eval_prompts):
            kept, heldout = split_prompts(train, fraction, seed=SPLIT_SEED)
            if heldout:
                train, evaluation = kept, heldout
                how = (f"{len(heldout)} of the {len(kept) + len(heldout)} distinct prompts of {source} held out for "
                       f"evaluation (heldout_fraction {fraction:g}, seeded shuffle, seed {SPLIT_SEED})")
            else:
                how += f" (heldout_fraction {fraction:g} of {len(kept)} prompt(s) holds none out)"
    else:
        train, evaluation = world.default_prompts()
        how = f"the {world.name} world's default prompts and evaluation split"
    if cfg.eval_prompt_file:
        evaluation = list(load_prompts(cfg.eval_prompt_file).prompts)
        world.check_prompts(evaluation)
        excluded = set(evaluation)
        train = [p for p in train if p not in excluded]
        if not train:
            raise UserError(f"every training prompt is in the evaluation prompt file {cfg.eval_prompt_file}: "
                            "nothing is left to train on")
        how = f"{how.split(';')[0]}; evaluation prompts from {cfg.eval_prompt_file}, removed from the training prompts"
    elif cfg.eval_prompts:
        evaluation = list(cfg.eval_prompts)
        world.check_prompts(evaluation)
        how = f"{how.split(';')[0]}; evaluation prompts from --eval-prompts"
    held_out = not set(evaluation) & set(train)
    return PromptSplit(list(train), list(dict.fromkeys(evaluation)), held_out, how)


def training_prompts(cfg, world) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts) of `prompt_split`."""
    split = prompt_split(cfg, world)
    return split.train, split.eval
