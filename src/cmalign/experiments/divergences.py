"""KL / JS / Hellinger / Fisher compared at each one's best beta: the best beta (by final gold) is
read from a beta-sweep summary (`--out` of `cmalign experiment beta-sweep`, looked up beside this
experiment's directory as ../beta-sweep[-quick]/summary.csv) or found by running that sweep first;
each divergence is then re-run at its best beta with a second seed, and both seeds are reported,
with the seed-1 run's proxy, accuracy and diversity, and its final samples side by side in one grid
(columns: base model, then each divergence; rows: classes; the same fixed evaluation noise)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from cmalign.training.evaluation import save_grid
from cmalign.experiments import beta_sweep
from cmalign.experiments.common import make_config, plot, summary, train_run, write_report, write_table

PER_CELL = 4  # samples per class and model in the side-by-side grid


def best_betas(sweep_csv: Path) -> dict[str, float]:
    best: dict[str, tuple[float, float]] = {}
    for r in csv.DictReader(open(sweep_csv)):
        beta, gold = float(r["beta"]), float(r["gold_final"])
        if beta > 0 and (r["divergence"] not in best or gold > best[r["divergence"]][1]):
            best[r["divergence"]] = (beta, gold)
    return {d: b for d, (b, _) in best.items()}


def class_rows(images: torch.Tensor, prompts: list[str], per: int) -> list[torch.Tensor]:
    """The first `per` images of each distinct prompt, one tensor per prompt (in prompt order)."""
    distinct = list(dict.fromkeys(prompts))
    return [images[[i for i, q in enumerate(prompts) if q == p][:per]] for p in distinct]


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None) -> Path:
    steps = steps or (2 if quick else 150)
    sweep_dir = out.parent / ("beta-sweep" + ("-quick" if quick else ""))
    if not (sweep_dir / "summary.csv").is_file():
        sweep_dir = out / "beta-sweep"
        beta_sweep.run(sweep_dir, quick=quick, threads=threads, steps=steps)
    betas = best_betas(sweep_dir / "summary.csv")
    sweep = {(r["divergence"], float(r["beta"])): r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    table, columns = [], []
    for div, beta in betas.items():
        cfg = make_config(quick, threads, method="rocm", divergence=div, beta=beta, steps=steps, seed=1,
                          **({} if quick else {"eval_every": 25}))
        rows, result = train_run(cfg, out / "runs" / f"{div}-beta{beta:g}-seed1", keep_result=True)
        s1 = summary(rows)
        prompts = result.eval_prompts
        if not columns:
            columns.append(class_rows(result.base_eval_images, prompts, PER_CELL))
        columns.append(class_rows(result.last_eval_images, prompts, PER_CELL))
        s0 = sweep[(div, beta)]
        table.append({"divergence": div, "best_beta": beta, "gold_final_seed0": float(s0["gold_final"]),
                      "gold_final_seed1": s1["gold_final"], "gold_peak_seed1": s1["gold_peak"],
                      "proxy_final_seed1": s1["proxy_final"], "accuracy_final_seed1": s1["accuracy_final"],
                      "diversity_seed1": round(result.world.diversity(result.last_eval_images, prompts), 4),
                      "s_per_step_seed1": s1["s_per_step"]})
    base_div = round(result.world.diversity(result.base_eval_images, prompts), 4)
    gap = torch.full_like(columns[0][0][:1], 0.5)  # a grey tile between the models' blocks
    grid = torch.cat([torch.cat([t for col in columns for t in (col[r], gap)][:-1]) for r in range(len(columns[0]))])
    save_grid(grid, out / "grids.png", nrow=sum(len(col[0]) for col in columns) + len(columns) - 1)
    t, _ = write_table(out, "summary", table, f"Each divergence at its best beta ({steps} steps; final gold, two seeds)",
                       [f"best beta taken from {sweep_dir / 'summary.csv'} (seed 0); seed 1 re-run here",
                        f"diversity: mean pairwise L2 distance within a class on the fixed evaluation set (base model: {base_div})",
                        "grids.png: columns of " + str(PER_CELL) + " samples each: base, " + ", ".join(betas) + "; a row per class"])
    img = plot(out, "gold_by_divergence", {f"seed {s}": (list(range(len(table))), [r[f"gold_final_seed{s}"] for r in table]) for s in (0, 1)},
               "divergence (" + ", ".join(r["divergence"] for r in table) + ")", "final gold (eval)")
    return write_report(out, "divergences", quick, [t], [img, out / "grids.png"])
