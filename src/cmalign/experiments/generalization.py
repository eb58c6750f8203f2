"""Generalization: train on half of the digit classes, evaluate on the other half. The validation chains scored
during training hold only held-out classes (so the curve is held-out gold); at the end base and tuned models are
scored on fresh test noise, PER_CLASS chains per class, for the trained and the held-out classes (the same noise
for base and tuned, so each chain's gain is paired). Question (the paper's claim): does the divergence term keep
the held-out gains as well as the trained ones, where beta = 0 over-fits the proxy on the trained classes?

Reported (experiments/protocol.py's rows and intervals): per run, the test gold, gain over the base model and
accuracy on each split; with 95% intervals over seeds and chains, and the gaps of beta = 3 to the other betas.
The default (one seed, 3 x 250 steps x batch 32, in order) takes about 8 minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmalign.chain import ChainNoise
from cmalign.training.evaluation import evaluate
from cmalign.prompts import split_prompts
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt
from cmalign.experiments.common import make_config, plot_bands, seed_band, seed_cells, train_run, write_report
from cmalign.experiments.protocol import cell_of, gap_intervals, mark_selected, metric_intervals, run_row, significant, write_data

BETAS = (0.0, 3.0, 6.0)
PER_CLASS = 100  # fresh test chains per class: 500 per split
SPLITS = ("trained", "heldout")
# summary columns -> the per-chain test columns behind them
METRICS = {f"test_{split}_{name}": f"{split}_{name}" for split in SPLITS for name in ("gold", "gain", "accuracy", "base_gold")}


def class_split() -> tuple[list[str], list[str]]:
    """(trained, held-out) class prompts: a seeded half/half split of the ten classes."""
    return split_prompts([class_prompt(c) for c in range(NUM_CLASSES)], 0.5, seed=0)


def final_scores(result, prompts: list[str], per_class: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-chain gold and accuracy of the tuned model, the base model's gold and the tuned model's gain over it on
    the same fresh noise (seed 10**6 + run seed); and each model's diversity (a property of the whole set)."""
    cfg, world = result.config, result.world
    chain_prompts = [p for p in prompts for _ in range(per_class)]
    gen = torch.Generator().manual_seed(10**6 + cfg.seed)
    noise = ChainNoise.draw(len(chain_prompts), world.latent_shape, cfg.num_steps, gen, world.device, world.dtype)
    scores, diversity = {}, {}
    for label, use_adapter in (("base", False), ("tuned", True)):
        s, images = evaluate(world, result.reward, chain_prompts, noise, cfg.num_steps, use_adapter=use_adapter, against_base=False)
        scores[label] = {k: s[k].numpy().astype(np.float64) for k in ("gold", "accuracy")}
        diversity[label] = world.diversity(images, chain_prompts)
    chains = {"gold": scores["tuned"]["gold"], "accuracy": scores["tuned"]["accuracy"], "base_gold": scores["base"]["gold"],
              "gain": scores["tuned"]["gold"] - scores["base"]["gold"]}
    return chains, diversity


def train_arm(out: Path, beta: float, quick: bool, threads: int, steps: int, seeds: int, per_class: int) -> tuple[list, dict, list]:
    """One beta's runs: their summary rows, (arm, cell, seed) -> test chain columns, and their metrics rows."""
    trained, heldout = class_split()
    arm = f"rocm-beta{beta:g}"
    cfg = make_config(quick, threads, method="rocm", beta=beta, steps=steps, prompts=trained, eval_prompts=heldout,
                      **({} if quick else {"eval_every": 25}))
    rows, chains, curves = [], {}, []
    for (_, seed), (seed_cfg, run_dir) in seed_cells({arm: (cfg, out / "runs" / f"beta{beta:g}")}, seeds).items():
        metrics, result = train_run(seed_cfg, run_dir, keep_result=True)
        columns, diversity = {}, {}
        for split, prompts in zip(SPLITS, (trained, heldout)):
            split_chains, split_diversity = final_scores(result, prompts, per_class)
            columns.update({f"{split}_{k}": v for k, v in split_chains.items()})
            diversity.update({f"test_{split}_{m}_diversity": significant(v) for m, v in split_diversity.items()})
        row = {**run_row(arm, seed_cfg, seed, metrics, columns, METRICS), **diversity}
        rows.append(row)
        chains[(arm, cell_of(row), seed)] = columns
        curves.append(metrics)
    return rows, chains, curves


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1) -> Path:
    steps = steps or (2 if quick else 250)
    per_class = 3 if quick else PER_CLASS
    rows, chains, curves = [], {}, {}
    for beta in ((0.0, 3.0) if quick else BETAS):
        arm_rows, arm_chains, arm_curves = train_arm(out, beta, quick, threads, steps, seeds, per_class)
        rows += arm_rows
        chains.update(arm_chains)
        curves[f"beta={beta:g}"] = arm_curves
    selected = mark_selected(rows)  # one cell per beta: each is reported
    intervals = metric_intervals(chains, selected, METRICS)
    intervals += gap_intervals(chains, selected, "rocm-beta3", {q: METRICS[q] for q in ("test_trained_gold", "test_heldout_gold",
                                                                                      "test_trained_gain", "test_heldout_gain")})
    trained, heldout = class_split()
    parts = write_data(out, rows, intervals, f"ROCM trained on {len(trained)} classes, scored on {len(heldout)} held-out ones ({steps} steps)",
                       ["trained classes: " + ", ".join(trained), "held-out classes: " + ", ".join(heldout),
                        f"test: {per_class} fresh chains per class, the same noise for base and tuned; gain: tuned minus base "
                        "gold, chain by chain; val_*: the validation chains (held-out classes only)"])
    img = plot_bands(out, "heldout_gold", {k: seed_band(v, "step") for k, v in curves.items()}, "step",
                     "held-out validation gold (band: lowest to highest seed)")
    return write_report(out, "generalization", quick, parts, [img])
