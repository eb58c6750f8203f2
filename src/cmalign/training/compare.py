"""Base versus tuned the way papers report it: the same prompts and per-image noise seeds for every model,
each reward scored separately at each step count K, intervals by a bootstrap over prompts, paired deltas
and win rates against the base model (docs/evaluation.md)."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmalign.training.evaluation import evaluate, image_grid, seeded_noise

BOOTSTRAP_SAMPLES = 1000


@dataclass
class ModelSpec:
    """A model to score: its name in the tables ("base" or the run's folder name) and how to build its world."""

    name: str
    build: Callable[[], object]


@dataclass
class Comparison:
    """scores[model][reward][K]: (prompts, num_per_prompt) arrays; images[model][K]: PNG paths relative to the out folder."""

    prompts: list[str]
    num_per_prompt: int
    seeds: list[int]
    scores: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    diversity: dict = field(default_factory=dict)
    rewards: dict | None = field(default=None, repr=False)  # {name: (weight, reward)}, built with the first world


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def bootstrap_ci(per_prompt: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float | None]:
    """95% percentile interval of the mean, resampling prompts with replacement (each prompt's samples stay
    together); widened to hold the point estimate when a tiny set makes the percentiles miss it."""
    values = np.asarray(per_prompt, dtype=np.float64)
    mean = values.mean()
    if not np.isfinite(values).all():
        return [None, None]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [_finite(min(lo, mean)), _finite(max(hi, mean))]


def summary_row(model: str, reward: str, k: int, s: np.ndarray, base: np.ndarray | None, seed: int = 0) -> dict:
    """One row of summary.json; s and base: (prompts, num_per_prompt) scores from the same prompts and noise."""
    row = {"model": model, "reward": reward, "num_steps": int(k), "n": int(s.size), "mean": _finite(s.mean()),
           "ci95": bootstrap_ci(s.mean(1), seed), "delta_vs_base": None, "delta_ci95": None, "win_rate_vs_base": None}
    if base is not None:
        d = s - base
        row.update(delta_vs_base=_finite(d.mean()), delta_ci95=bootstrap_ci(d.mean(1), seed),
                   win_rate_vs_base=float((s > base).mean()))
    return row


def summary_rows(comparison: Comparison, base: str | None = "base") -> list[dict]:
    """A row per model x reward x K; models other than `base` carry paired deltas and win rates."""
    rows = []
    for model, by_reward in comparison.scores.items():
        for reward, by_k in by_reward.items():
            for k, s in by_k.items():
                paired = comparison.scores.get(base, {}).get(reward, {}).get(k) if model != base else None
                rows.append(summary_row(model, reward, k, s, paired))
    return rows


def safe_name(name: str, taken: set[str]) -> str:
    """A folder name for a model: its name with odd characters replaced, made unique."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _save_images(images: torch.Tensor, out: Path | None, folder: str) -> list[str]:
    if out is None:
        return []
    (out / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{folder}/{i:05d}.png"
        image_grid(img[None], 1, cell=img.shape[-1] if img.shape[-1] >= 64 else 64).save(out / name)
        names.append(name)
    return names


def score_model(comparison: Comparison, spec: ModelSpec, make_rewards, ks: list[int], out: Path | None, folder: str,
                progress=None) -> None:
    """Every K of one model: its images from the shared per-image seeds, scored by each reward separately
    (make_rewards(world) -> {name: (weight, reward)}, called once) and by the world's own metrics; images
    written under out/images/."""
    world = spec.build()
    if comparison.rewards is None:
        comparison.rewards = make_rewards(world)
    rewards = comparison.rewards
    prompts = [p for p in comparison.prompts for _ in range(comparison.num_per_prompt)]
    shape = (len(comparison.prompts), comparison.num_per_prompt)
    for k in ks:
        noise = seeded_noise(comparison.seeds, world.latent_shape, k, world.device, world.dtype)
        scores, images = evaluate(world, None, prompts, noise, k, against_base=False, extra_rewards=rewards,
                                  on_batch=progress.update if progress is not None else None)
        for key, values in scores.items():
            name = key.removeprefix("heldout_") if key.removeprefix("heldout_") in rewards else key
            comparison.scores.setdefault(spec.name, {}).setdefault(name, {})[k] = values.numpy().reshape(shape)
        comparison.diversity.setdefault(spec.name, {})[k] = _finite(world.diversity(images, prompts))
        comparison.images.setdefault(spec.name, {})[k] = _save_images(images, out, f"images/{folder}/K{k}")
    del world


def run_comparison(models: list[ModelSpec], make_rewards, prompts: list[str], ks: list[int], num_per_prompt: int,
                   seed: int, out: Path | None, progress: bool = True, indices: list[int] | None = None) -> Comparison:
    """Score every model at every K on the same prompts and noise: image i of the prompt at position `index` in its
    source file (default: its position here) has the seed seed + index * num_per_prompt + i, so a filtered or
    limited run draws the same images as the full one."""
    from tqdm.auto import tqdm

    n = len(prompts) * num_per_prompt
    indices = list(range(len(prompts))) if indices is None else indices
    comparison = Comparison(list(prompts), num_per_prompt, [seed + idx * num_per_prompt + i for idx in indices
                                                            for i in range(num_per_prompt)])
    taken: set[str] = set()
    with tqdm(total=n * len(ks) * len(models), desc="cmalign eval", disable=not progress) as bar:
        for spec in models:
            score_model(comparison, spec, make_rewards, ks, out, safe_name(spec.name, taken), bar)
    return comparison


def write_per_prompt(comparison: Comparison, path: Path) -> None:
    """per_prompt.csv: one line per model x K x sample: model, prompt, seed, K, then one column per reward."""
    rewards = list(dict.fromkeys(r for by_reward in comparison.scores.values() for r in by_reward))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "prompt", "seed", "K", *rewards])
        for model, by_reward in comparison.scores.items():
            ks = list(next(iter(by_reward.values())).keys()) if by_reward else []
            for k in ks:
                for j, seed in enumerate(comparison.seeds):
                    p, i = divmod(j, comparison.num_per_prompt)
                    values = [by_reward.get(r, {}).get(k) for r in rewards]
                    writer.writerow([model, comparison.prompts[p], seed, k,
                                     *("" if v is None else f"{float(v[p, i]):.6g}" for v in values)])
