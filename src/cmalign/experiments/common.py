"""Shared pieces of the experiments: configs, one training run, tables (markdown + CSV), plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import TrainConfig  # noqa: E402

# The tiny digits models of the test-suite (pretrained in seconds into the cache on first use).
QUICK = dict(digits_model_size="tiny", pretrain_teacher_steps=40, pretrain_distill_steps=30, proxy_pairs=200,
             batch_size=4, steps=2, eval_every=1, grid_every=1000, eval_size=10, final_eval_size=0, ddpo_steps=3)
# The real runs: the default base model and proxy, evaluation of 200 fixed chains every 10 steps.
FULL = dict(batch_size=32, eval_every=10, grid_every=100, eval_size=200, final_eval_size=0)


def make_config(quick: bool, threads: int = 1, **overrides) -> TrainConfig:
    base = dict(QUICK if quick else FULL)
    base.update(threads=threads)
    base.update(overrides)
    return TrainConfig(**base)


def train_run(cfg: TrainConfig, run_dir: Path, keep_trainer: bool = False):
    """Train one configuration into run_dir (overwriting) and return its metrics rows
    (and the finished Trainer, whose world holds the tuned adapter, when keep_trainer)."""
    from ..config import validate
    from ..trainer import Trainer, _config_diff

    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    if not keep_trainer and finished(run_dir) and not _config_diff(validate(dataclasses.replace(cfg)),
                                                                   (run_dir / "config.yaml").read_text(), ignore=("threads", "output_dir")):
        print(f"cmalign: reusing the finished run {run_dir} (same configuration)", flush=True)
        return read_metrics(run_dir)
    trainer = Trainer(cfg, overwrite=True, progress=False)
    trainer.train()
    rows = read_metrics(run_dir)
    return (rows, trainer) if keep_trainer else rows


def finished(run_dir: Path) -> bool:
    """A run that wrote its adapter (the trainer's last act) and its configuration."""
    return (run_dir / "adapter").is_dir() and (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seeded_runs(cfg: TrainConfig, run_dir: Path, seeds: int) -> list[list[dict]]:
    """The same configuration trained with seeds 0..seeds-1 (run_dir/seedN), metrics rows of each."""
    return [train_run(dataclasses.replace(cfg, seed=s), run_dir / f"seed{s}") for s in range(seeds)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return round(m, 4), round(sd, 4)


def eval_rows(rows: list[dict]) -> list[dict]:
    """The rows that hold a fixed-set evaluation (step 0 and every eval_every steps)."""
    return [r for r in rows if "eval_gold" in r or "eval_reward" in r]


def first_reaching(points: list[dict], target: float, key: str = "eval_gold") -> dict | None:
    """The first evaluation point whose `key` is at or above target (None: never reached)."""
    return next((p for p in points if p[key] >= target - 1e-9), None)


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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
