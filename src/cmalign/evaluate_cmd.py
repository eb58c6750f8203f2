"""`cmalign sample` and `cmalign eval`.

sample: PNGs and samples.npz (images, prompts, per-image seeds, K, guidance) from a run or the base model.
eval: the base model and zero or more runs on the same prompts and per-image noise, every reward scored
separately at every K; OUT/summary.json (bootstrap intervals over prompts, paired deltas, win rates),
per_prompt.csv, report.html, images/ (docs/evaluation.md).

cli.py dispatches here and hands in its tyro `parse` and `train_arguments` (the model flags of
`cmalign train`: --preset, --config, --world, --lcm.model, --resolution, --reward-weights, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmalign.errors import UserError
from cmalign.training.run_dir import ensure_writable_dir, writing

PROMPT_FLAGS = ("--prompts", "--prompt-file", "--prompt-category", "--prompt-challenge", "--prompt-limit")
EVAL_FLAGS = ("--run", "--num-steps", "--num-per-prompt", "--seed", "--out", *PROMPT_FLAGS)


@dataclass
class PromptArgs:
    prompts: list[str] | None = None
    """Prompts to use; default: the world's evaluation prompts."""
    prompt_file: str | None = None
    """[FORMAT:]PATH of a prompt set (parti, drawbench, hpsv2, geneval, pickapic, txt) or a built-in set's name (varied, simple_animals)."""
    prompt_category: list[str] | None = None
    """Keep these categories of the prompt file (parti, drawbench: Category; hpsv2: style; geneval: tag)."""
    prompt_challenge: list[str] | None = None
    """Keep these PartiPrompts challenges."""
    prompt_limit: int | None = None
    """Keep the first N prompts (after the filters)."""


@dataclass
class SampleArgs(PromptArgs):
    run: str | None = None
    """Run directory whose adapter to use; without it, the base model."""
    world: Literal["digits", "lcm"] = "digits"
    """World of the base model when no run is given."""
    num_per_prompt: int = 8
    """Samples per prompt."""
    num_steps: int | None = None
    """K; default: the run's (or 4)."""
    seed: int = 0
    """Seed of image 0; image i is drawn from its own generator seeded seed + i (as the stock pipelines draw it)."""
    out: str = "samples"
    """Output folder for PNGs and samples.npz."""
    guidance_scale: float | None = None
    """lcm world: guidance-embedding scale; default: the run's."""
    digits_grid: int = 1
    """digits world without a run: the N x N compositional grid's base model (2, 3 or 4)."""


@dataclass
class EvalFlags(PromptArgs):
    run: list[str] = field(default_factory=list)
    """Run directories to compare with the base model, each its adapter or full weights on that base."""
    num_steps: list[int] | None = None
    """K values to score every model at (e.g. 1 2 4 8); default: the run's (or the config's) K."""
    num_per_prompt: int = 50
    """Samples per prompt."""
    seed: int = 20_000
    """Seed of sample 0; sample j is drawn from its own generator seeded seed + j, the same for every model and K."""
    out: str | None = None
    """Folder for summary.json, per_prompt.csv, report.html and images/ (the table is printed either way)."""


# --- prompts ----------------------------------------------------------------------------------------------
def prompt_set(a: PromptArgs, world=None) -> tuple[list[str], str, list[int]]:
    """prompt_list and each prompt's index in its source (the publisher's file: the seeds follow it)."""
    from cmalign.prompts import load_prompts

    if a.prompt_file:
        prompts, source = prompt_list(a, world)
        found = load_prompts(a.prompt_file, category=a.prompt_category, challenge=a.prompt_challenge, limit=a.prompt_limit)
        return prompts, source, [int(m.get("index", i)) for i, m in enumerate(found.metadata)]
    prompts, source = prompt_list(a, world)
    return prompts, source, list(range(len(prompts)))


def prompt_list(a: PromptArgs, world=None) -> tuple[list[str], str]:
    """(prompts, where they came from): --prompts, --prompt-file with its filters, or the world's eval prompts."""
    from cmalign.prompts import load_prompts

    filters = a.prompt_category is not None or a.prompt_challenge is not None or a.prompt_limit is not None
    if a.prompts and a.prompt_file:
        raise UserError("give --prompts or --prompt-file, not both")
    if a.prompt_file:
        found = load_prompts(a.prompt_file, category=a.prompt_category, challenge=a.prompt_challenge, limit=a.prompt_limit)
        return list(found.prompts), found.describe()
    if filters:
        raise UserError("--prompt-category, --prompt-challenge and --prompt-limit filter a --prompt-file")
    if a.prompts:
        if not all(p.strip() for p in a.prompts):
            raise UserError("prompts must be non-empty strings")
        return list(a.prompts), "--prompts"
    if world is None:
        return [], ""
    return list(world.default_prompts()[1]), f"the {world.name} world's evaluation prompts"


# --- sample -----------------------------------------------------------------------------------------------
def _sample_world(args: SampleArgs):
    """(config, world, K): the run's world with its adapter, or the base model; K from --num-steps or the run's chain."""
    from cmalign.config import TrainConfig, validate, with_changes
    from cmalign.methods.registry import method_class
    from cmalign.training.build import build_world
    from cmalign.training.full_finetune import load_trained

    if args.num_steps is not None and args.num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {args.num_steps}")
    if args.guidance_scale is not None and not (args.guidance_scale >= 0 and args.guidance_scale < float("inf")):
        raise UserError(f"guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if args.run:
        cfg = run_config(Path(args.run))
    else:
        cfg = with_changes(TrainConfig(world=args.world), **{"digits.grid": args.digits_grid})
        if args.digits_grid != 1:
            validate(cfg)  # the grid's range, before any model loads
    if args.guidance_scale is not None:  # before the world is built: the world embeds it
        cfg = with_changes(cfg, **{"lcm.guidance_scale": args.guidance_scale})
    check_num_steps([args.num_steps] if args.num_steps is not None else [], cfg)
    world = build_world(cfg, lora=bool(args.run) and cfg.finetune == "lora")
    if args.run:
        load_trained(world, Path(args.run) / "adapter", cfg)  # the adapter, or a full fine-tune's network
    return cfg, world, args.num_steps or method_class(cfg.method).chain_length(cfg)


def cmd_sample(args: list[str], parse) -> int:
    import numpy as np

    from cmalign.training.evaluation import generate_seeded, image_grid

    a = parse(SampleArgs, args, "cmalign sample")
    if a.num_per_prompt < 1:
        raise UserError(f"num_per_prompt must be >= 1, got {a.num_per_prompt}")
    prompt_list(a)  # a bad prompt file fails before any model loads
    out = ensure_writable_dir(a.out, "--out folder")  # before any expensive work
    cfg, world, k = _sample_world(a)
    prompts = [p for p in prompt_list(a, world)[0] for _ in range(a.num_per_prompt)]
    seeds = [a.seed + i for i in range(len(prompts))]
    images = generate_seeded(world, prompts, seeds, k)
    guidance = float(getattr(world, "guidance_scale", float("nan")) or 0.0) if cfg.world != "digits" else float("nan")
    with writing("samples into", out):
        for i, img in enumerate(images):
            image_grid(img[None], 1).save(out / f"{i:05d}.png")
        image_grid(images, nrow=a.num_per_prompt if a.num_per_prompt <= 16 else 16).save(out / "grid.png")
        np.savez(out / "samples.npz", images=images.numpy().astype(np.float32), prompts=np.array(prompts),
                 seeds=np.array(seeds, dtype=np.int64), num_steps=np.int64(k), guidance_scale=np.float64(guidance))
    print(f"cmalign: wrote {len(images)} samples to {out}/ (PNGs, grid.png, samples.npz with each image's prompt and seed)")
    return 0


# --- eval -------------------------------------------------------------------------------------------------
def split_args(args: list[str], own: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the flags in `own` with their values, the rest): a value belongs to the flag before it."""
    mine, rest, to_mine = [], [], False
    for a in args:
        if a.startswith("--") or a == "-h":
            to_mine = a.split("=", 1)[0].replace("_", "-") in own
        (mine if to_mine else rest).append(a)
    return mine, rest


def _without(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """args without the flags `keys` and their values (--key V [V ...] or --key=V)."""
    out, dropping = [], False
    for a in args:
        if a.startswith("--"):
            dropping = a.split("=", 1)[0] in keys
        if not dropping:
            out.append(a)
    return out


def run_config(run: Path):
    from cmalign.config import load_preset

    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    if not (run / "adapter").is_dir():
        raise UserError(f"{run} holds no finished adapter (adapter/ is missing): the run did not finish")
    return load_preset(str(run / "config.yaml"))


def model_configs(flags: EvalFlags, rest: list[str], train_arguments):
    """(base config, [(run path, its config)], overwrite): the base from the model flags (default: the first
    run's base), each run's config with the same model flags on top (e.g. --lcm.model DIR where its base moved)."""
    from cmalign.config import cli_aliases
    from cmalign.worlds.registry import WORLDS

    rest = cli_aliases(rest)
    keys = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    runs = [(Path(r), run_config(Path(r))) for r in flags.run]
    if not keys & {"--preset", "--config", "--world"}:
        named = [k[2:].split(".", 1)[0] for k in keys if "." in k]
        worlds = [w for w in named if w in WORLDS.names()]
        rest = (["--config", str(runs[0][0] / "config.yaml")] if runs else ["--world", worlds[0]] if worlds else []) + rest
    cfg, overwrite, resume = train_arguments(rest)
    if resume is not None:
        raise UserError("--resume belongs to cmalign train")
    model_flags = _without(rest, ("--preset", "--config", "--world", "--reward-weights", "--reward-paths"))
    configs = []
    for path, run_cfg in runs:
        run_cfg = train_arguments(["--config", str(path / "config.yaml"), *model_flags])[0]
        if run_cfg.world != cfg.world:
            raise UserError(f"run {path} is a {run_cfg.world} run, but the base model is a {cfg.world} world")
        configs.append((path, run_cfg))
    return cfg, configs, overwrite


def check_num_steps(ks: list[int], cfg) -> None:
    """Every K within the chain's skipping grid over the original steps (a ddpo run: its DDIM steps)."""
    from cmalign.methods.registry import method_class

    limit = max(50, method_class(cfg.method).chain_length(cfg))
    if any(k > limit for k in ks):
        raise UserError(f"num_steps must be in [1, {limit}] (the chain's skipping grid over the original steps), "
                        f"got {' '.join(map(str, ks))}")


def check_eval_args(a: EvalFlags) -> None:
    if a.num_steps is not None and (not a.num_steps or min(a.num_steps) < 1):
        raise UserError(f"num_steps must be >= 1, got {' '.join(map(str, a.num_steps)) or 'nothing'}")
    if a.num_per_prompt < 1:
        raise UserError(f"num_per_prompt must be >= 1, got {a.num_per_prompt}")
    if a.seed < 0:
        raise UserError(f"seed must be >= 0, got {a.seed}")


def prepare_out(out: str | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    folder = ensure_writable_dir(out, "--out folder")
    if (folder / "summary.json").exists() and not overwrite:
        raise UserError(f"{folder} already holds an evaluation (summary.json); choose another --out or pass --overwrite")
    return folder


def model_specs(cfg, runs, device):
    from cmalign.training.build import build_world
    from cmalign.training.compare import ModelSpec
    from cmalign.training.full_finetune import load_trained

    def run_world(path, run_cfg):
        world = build_world(run_cfg, device, lora=run_cfg.finetune == "lora")
        load_trained(world, path / "adapter", run_cfg)
        return world

    specs = [ModelSpec("base", lambda: build_world(cfg, device, lora=False))]
    return specs + [ModelSpec(path.name, lambda p=path, c=run_cfg: run_world(p, c)) for path, run_cfg in runs]


def scored_rewards(cfg):
    """world -> {name: (weight, reward)}: each reward of --reward-weights built alone (never summed)."""
    from cmalign.rewards.registry import build_reward, reward_context

    def make(world):
        ctx = reward_context(world, cfg, world.device)
        return {name: (float(w), build_reward(name, ctx)) for name, w in cfg.reward_weights.items()}

    return make


def print_table(rows: list[dict]) -> None:
    fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"{'model':<20}{'reward':<24}{'K':>3}{'n':>7}{'mean':>10}  {'95% CI':<22}{'delta':>10}{'win':>7}")
    for r in rows:
        ci = f"[{fmt(r['ci95'][0])}, {fmt(r['ci95'][1])}]"
        win = "–" if r["win_rate_vs_base"] is None else f"{r['win_rate_vs_base']:.2f}"
        print(f"{r['model'][:19]:<20}{r['reward'][:23]:<24}{r['num_steps']:>3}{r['n']:>7}{fmt(r['mean']):>10}  {ci:<22}"
              f"{fmt(r['delta_vs_base']):>10}{win:>7}")


def write_outputs(out: Path, comparison, rows: list[dict], meta: dict, config_text: str) -> None:
    from cmalign.training.compare import write_per_prompt
    from cmalign.training.report_html import eval_report

    with writing("the evaluation into", out):
        (out / "summary.json").write_text(json.dumps({"rows": rows, **meta}, indent=2))
        write_per_prompt(comparison, out / "per_prompt.csv")
        eval_report(out, rows, comparison, config_text)


def cmd_eval(args: list[str], parse, train_arguments) -> int:
    from cmalign.config import to_yaml, validate
    from cmalign.config.checks import check_scored_rewards
    from cmalign.methods.registry import method_class
    from cmalign.training.compare import run_comparison, summary_rows
    from cmalign.training.trainer import device_of
    from cmalign.worlds.registry import world_class

    mine, rest = split_args(args, EVAL_FLAGS + ("-h", "--help"))
    a = parse(EvalFlags, mine, "cmalign eval [model flags of cmalign train: --preset, --world, --lcm.model, --resolution, "
                               "--reward-weights, --reward-paths, ...]")
    check_eval_args(a)
    cfg, runs, overwrite = model_configs(a, rest, train_arguments)
    validate(cfg, check_rewards=False)
    check_scored_rewards(cfg.reward_weights, cfg.reward_paths, world_class(cfg.world), "reward_weights")
    prompt_list(a)  # a bad prompt file fails before any model loads
    out = prepare_out(a.out, overwrite)  # before any expensive work
    ks = a.num_steps or [method_class(cfg.method).chain_length(runs[0][1] if runs else cfg)]
    check_num_steps(ks, cfg)
    specs = model_specs(cfg, runs, device_of(cfg))
    base_world = specs[0].build()
    prompts, source, indices = prompt_set(a, base_world)
    base_world.check_prompts(prompts)
    specs[0].build = lambda: base_world
    print(f"cmalign: {source}; {len(prompts)} prompts x {a.num_per_prompt} samples, K = {' '.join(map(str, ks))}, "
          f"{len(specs)} model(s)", flush=True)
    comparison = run_comparison(specs, scored_rewards(cfg), prompts, list(dict.fromkeys(ks)), a.num_per_prompt, a.seed, out,
                                indices=indices)
    rows = summary_rows(comparison)
    print_table(rows)
    if out is not None:
        meta = {"models": {"base": "base model", **{p.name: str(p) for p, _ in runs}}, "prompts": source,
                "num_prompts": len(prompts), "num_per_prompt": a.num_per_prompt, "seed": a.seed,
                "seeds": "image i of the prompt at index p of its source has seed seed + p * num_per_prompt + i "
                         "(per_prompt.csv lists each)", "diversity": comparison.diversity}
        write_outputs(out, comparison, rows, meta, to_yaml(cfg))
        print(f"cmalign: wrote {out}/ (summary.json, per_prompt.csv, report.html, images/)")
    return 0
