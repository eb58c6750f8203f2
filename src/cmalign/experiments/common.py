"""Shared pieces of the experiments: configs, one training run, tables (markdown + CSV), plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cmalign.config import TrainConfig  # noqa: E402
from cmalign.config.checks import owned_sections  # noqa: E402
from cmalign.methods.registry import method_class  # noqa: E402
from cmalign.worlds.registry import world_class  # noqa: E402

# The tiny digits models of the test-suite (pretrained in seconds into the cache on first use).
QUICK = {"digits.model_size": "tiny", "digits.pretrain_teacher_steps": 40, "digits.pretrain_distill_steps": 30,
         "digits.proxy_pairs": 200, "batch_size": 4, "steps": 2, "eval_every": 1, "grid_every": 1000, "eval_size": 10,
         "final_eval_size": 0, "ddpo.steps": 3}
# The real runs: the default base model and proxy, evaluation of 200 fixed chains every 10 steps.
FULL = dict(batch_size=32, eval_every=10, grid_every=100, eval_size=200, final_eval_size=0)


def make_config(quick: bool, threads: int = 1, **overrides) -> TrainConfig:
    """The experiment's base settings with overrides: common fields or "section.field" keys."""
    return only_owned_sections(TrainConfig(**{**(QUICK if quick else FULL), "threads": threads, **overrides}))


def only_owned_sections(cfg: TrainConfig) -> TrainConfig:
    """cfg with the sections that neither its world nor its method owns at their defaults (the shared QUICK
    settings name ddpo's steps for every method; validation refuses a setting that no part of the run uses)."""
    owned = owned_sections(world_class(cfg.world), method_class(cfg.method))
    sections = {name: s if name in owned else type(s)() for name, s in cfg.sections.items()}
    return dataclasses.replace(cfg, sections=sections)


def train_run(cfg: TrainConfig, run_dir: Path, keep_result: bool = False):
    """Train one configuration into run_dir (overwriting) and return its metrics rows
    (and the TrainResult, whose world holds the tuned adapter, when keep_result)."""
    from cmalign.training.trainer import train

    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    if not keep_result and reusable(cfg, run_dir):
        print(f"cmalign: reusing the finished run {run_dir} (same configuration)", flush=True)
        return read_metrics(run_dir)
    result = train(cfg, overwrite=True, progress=False)
    return (result.metrics, result) if keep_result else result.metrics


def finished(run_dir: Path) -> bool:
    """A run that wrote its adapter (the trainer's last act) and its configuration."""
    return (run_dir / "adapter").is_dir() and (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def reusable(cfg: TrainConfig, run_dir: Path) -> bool:
    """A finished run in run_dir trained with this configuration (threads and output folder aside)."""
    from cmalign.config import config_diff, validate

    return finished(run_dir) and not config_diff(validate(dataclasses.replace(cfg, output_dir=str(run_dir))),
                                                 (run_dir / "config.yaml").read_text(), ignore=("threads", "output_dir"))


def train_runs(cells: dict, jobs: int = 1) -> dict:
    """Train every cell (key -> (config, run_dir)) and return key -> metrics rows. With jobs > 1 the
    runs that are not already finished train `jobs` at a time in spawned worker processes (each its
    own torch, `threads` threads); their rows are then read back in the cells' order."""
    todo = {str(d): (c, d) for c, d in cells.values() if not reusable(c, d)} if jobs > 1 else {}
    trained: set[str] = set()
    if len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        build_cached_models([cfg for cfg, _ in todo.values()])
        print(f"cmalign: training {len(todo)} runs, {min(jobs, len(todo))} at a time", flush=True)
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            # the longest runs first, so that none is left running alone at the end
            list(pool.map(_train_one, sorted(todo.values(), key=lambda cell: rough_cost(cell[0]), reverse=True)))
        trained = set(todo)
    return {key: read_metrics(d) if str(d) in trained else train_run(c, d) for key, (c, d) in cells.items()}


def build_cached_models(configs: list[TrainConfig]) -> None:
    """Build what the digits runs take from the cache (base model, proxy, classifier) here, once per
    distinct world, rather than in several workers at the same time."""
    from cmalign.rewards.registry import build_weighted, reward_context
    from cmalign.worlds.digits.classifier import load_classifier
    from cmalign.training.build import build_world
    from cmalign.worlds.digits.factory import pretrain_config_for
    from cmalign.worlds.digits import cache

    worlds = {(repr(pretrain_config_for(c)), c.digits.proxy_pairs, repr(sorted(c.reward_weights.items()))): c
              for c in configs if c.world == "digits"}
    for cfg in worlds.values():
        cache.locate(pretrain_config_for(cfg), True, False)
        build_weighted(cfg.reward_weights, reward_context(build_world(cfg, "cpu"), cfg, "cpu"))
        load_classifier(cfg.digits.resolution)


def rough_cost(cfg: TrainConfig) -> int:
    """Pixels (of the whole N x N grid) x network calls per chain x updates: enough to order runs by length."""
    return (cfg.digits.resolution * cfg.digits.grid) ** 2 * method_class(cfg.method).chain_length(cfg) * cfg.steps


def _train_one(cell: tuple[TrainConfig, Path]) -> None:
    train_run(*cell)
    print(f"cmalign: finished {cell[1]}", flush=True)


def seed_cells(cells: dict, seeds: int) -> dict:
    """Each cell (key -> (config, run_dir)) once per seed: (key, s) -> (config with seed s, run_dir/seed<s>)."""
    return {(key, s): (dataclasses.replace(cfg, seed=s), run_dir / f"seed{s}")
            for key, (cfg, run_dir) in cells.items() for s in range(seeds)}


def seeded_train_runs(cells: dict, seeds: int, jobs: int = 1) -> dict:
    """key -> [metrics rows of seed 0, 1, ...] for every cell, trained as train_runs does."""
    rows = train_runs(seed_cells(cells, seeds), jobs)
    return {key: [rows[(key, s)] for s in range(seeds)] for key in cells}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return round(m, 4), round(sd, 4)


def eval_rows(rows: list[dict]) -> list[dict]:
    """The rows that hold a fixed-set evaluation (step 0 and every eval_every steps)."""
    return [r for r in rows if "eval_gold" in r or "eval_reward" in r]


def wall(r: dict) -> float:
    return float(r.get("wall_time", 0.0) or 0.0)


def summary(rows: list[dict]) -> dict:
    ev = eval_rows(rows)
    gold = [r.get("eval_gold", float("nan")) for r in ev]
    peak_i = max(range(len(ev)), key=lambda i: gold[i])
    last = ev[-1]
    steps = max(r["step"] for r in rows)
    return {
        "steps": steps,
        "train_s": round(wall(rows[-1]), 2),
        "s_per_step": round(wall(rows[-1]) / max(steps, 1), 4),
        "gold_start": round(gold[0], 4),
        "gold_peak": round(gold[peak_i], 4),
        "peak_step": ev[peak_i]["step"],
        "gold_final": round(gold[-1], 4),
        "proxy_start": round(ev[0].get("eval_reward", float("nan")), 4),
        "proxy_final": round(last.get("eval_reward", float("nan")), 4),
        "accuracy_final": round(last.get("eval_accuracy", float("nan")), 4),
        "divergence_final": round(last["eval_divergence"], 5) if last.get("eval_divergence") is not None else "",
    }


def write_table(out: Path, name: str, rows: list[dict], title: str, notes: list[str] = ()) -> tuple[Path, Path]:
    """<name>.csv and <name>.md (a markdown table with a title and notes)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out / f"{name}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else ("–" if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else str(v))  # noqa: E731
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(lines))
    return md_path, csv_path


def plot(out: Path, name: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, logx: bool = False,
         linthresh: float = 1.0) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, ms=3, lw=1.2)
    if logx:
        ax.set_xscale("symlog", linthresh=linthresh)
    return saved_figure(fig, ax, out / f"{name}.png", xlabel, ylabel)


def saved_figure(fig, ax, path: Path, xlabel: str, ylabel: str) -> Path:
    """Label, grid and legend the axes, write the figure to path and close it. A long y label is wrapped so that
    it stays inside the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(textwrap.fill(ylabel, 40))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seed_band(runs: list[list[dict]], x: str, y: str = "eval_gold") -> tuple[list, list, list, list]:
    """(x, mean y, lowest y, highest y) over seeds at each validation evaluation every seed made (x: the seed mean)."""
    evs = [eval_rows(rows) for rows in runs]
    n = min(len(e) for e in evs)
    xs = [[float(e[i].get(x) or 0.0) for e in evs] for i in range(n)]
    ys = [[float(e[i][y]) for e in evs] for i in range(n)]
    return [sum(v) / len(v) for v in xs], [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot_bands(out: Path, name: str, series: dict[str, tuple[list, list, list, list]], xlabel: str, ylabel: str) -> Path:
    """Lines of the seed mean, each with its band (fill_between: the lowest to the highest seed)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (label, (xs, mean, lo, hi)) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(xs, mean, label=label, color=color, marker="o" if len(xs) < 30 else None, ms=3, lw=1.2)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
    return saved_figure(fig, ax, out / f"{name}.png", xlabel, ylabel)


def header(name: str, quick: bool, command: str) -> list[str]:
    import platform

    import torch

    return [f"# Experiment: {name}", "",
            f"- command: `{command}`",
            f"- date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
            f"- machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
            f"{' (quick: tiny test models; the numbers mean nothing)' if quick else ''}", ""]


def write_report(out: Path, name: str, quick: bool, parts: list[Path], images: list[Path], extra: list[str] = ()) -> Path:
    cmd = f"cmalign experiment {name}{' --quick' if quick else ''} --out {out}"
    lines = header(name, quick, cmd) + list(extra)
    for p in parts:
        lines += [p.read_text(), ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
