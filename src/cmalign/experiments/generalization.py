"""Generalization: train on half of the digit classes, evaluate on the other half. The fixed
evaluation set during training holds only held-out classes (so the curve is held-out gold); at the
end base and tuned models are scored on fresh noise for the trained and the held-out classes.
Question (the paper's claim): does the divergence term keep the held-out gains as well as the
trained ones, where beta = 0 over-fits the proxy on the trained classes?"""

from __future__ import annotations

from pathlib import Path

import torch

from cmalign.chain import ChainNoise
from cmalign.training.evaluation import evaluate
from cmalign.prompts import split_prompts
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt
from cmalign.experiments.common import eval_rows, make_config, mean_std, plot, seed_cells, summary, train_run, write_report, write_table

BETAS = (0.0, 3.0, 6.0)
PER_CLASS = 50  # fresh samples per class in the final comparison


def class_split() -> tuple[list[str], list[str]]:
    """(trained, held-out) class prompts: a seeded half/half split of the ten classes."""
    return split_prompts([class_prompt(c) for c in range(NUM_CLASSES)], 0.5, seed=0)


def final_scores(result, prompts: list[str], per_class: int) -> dict[str, dict[str, float]]:
    """Gold, accuracy and diversity of base and tuned on the same fresh noise (seed 10**6 + run seed)."""
    cfg, world = result.config, result.world
    chain_prompts = [p for p in prompts for _ in range(per_class)]
    gen = torch.Generator().manual_seed(10**6 + cfg.seed)
    noise = ChainNoise.draw(len(chain_prompts), world.latent_shape, cfg.num_steps, gen, world.device, world.dtype)
    out = {}
    for label, use_adapter in (("base", False), ("tuned", True)):
        scores, images = evaluate(world, result.reward, chain_prompts, noise, cfg.num_steps, use_adapter=use_adapter)
        out[label] = {"gold": scores["gold"].mean().item(), "accuracy": scores["accuracy"].mean().item(),
                      "diversity": world.diversity(images, chain_prompts)}
    return out


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1) -> Path:
    steps = steps or (2 if quick else 250)
    per_class = 3 if quick else PER_CLASS
    trained, heldout = class_split()
    table, curves = [], {}
    for beta in ((0.0, 3.0) if quick else BETAS):
        cfg = make_config(quick, threads, method="rocm", beta=beta, steps=steps, prompts=trained, eval_prompts=heldout,
                          **({} if quick else {"eval_every": 25}))
        results = []
        for (_, s), (seed_cfg, run_dir) in seed_cells({beta: (cfg, out / "runs" / f"beta{beta:g}")}, seeds).items():
            rows, result = train_run(seed_cfg, run_dir, keep_result=True)
            scores = {"trained": final_scores(result, trained, per_class), "heldout": final_scores(result, heldout, per_class)}
            results.append((rows, scores))
            if s == 0:
                ev = eval_rows(rows)
                curves[f"beta={beta:g}"] = ([r["step"] for r in ev], [r["eval_gold"] for r in ev])
        row = {"beta": beta, "seeds": seeds}
        for split in ("trained", "heldout"):
            for model in ("base", "tuned"):
                for metric in ("gold", "accuracy", "diversity"):
                    m, sd = mean_std([sc[split][model][metric] for _, sc in results])
                    row[f"{split}_{model}_{metric}"] = m
                    if seeds > 1 and metric == "gold" and model == "tuned":
                        row[f"{split}_tuned_gold_sd"] = sd
            row[f"{split}_gold_gain"] = round(row[f"{split}_tuned_gold"] - row[f"{split}_base_gold"], 4)
        row["heldout_gold_peak_during_training"] = summary(results[0][0])["gold_peak"]
        table.append(row)
    t, _ = write_table(out, "summary", table, f"ROCM trained on {len(trained)} classes, scored on {len(heldout)} held-out ones ({steps} steps)",
                       ["trained classes: " + ", ".join(trained), "held-out classes: " + ", ".join(heldout),
                        f"final scores: {per_class} fresh samples per class, the same noise for base and tuned",
                        "heldout_gold_peak_during_training: the best held-out gold on the fixed evaluation set (seed 0)"])
    img = plot(out, "heldout_gold", curves, "step", "held-out gold (eval)")
    return write_report(out, "generalization", quick, [t], [img])
