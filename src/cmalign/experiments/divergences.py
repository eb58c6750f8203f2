"""KL / JS / Hellinger / Fisher compared at each one's best beta: the best beta (by final gold) is
read from a beta-sweep summary (`--out` of `cmalign experiment beta-sweep`, looked up beside this
experiment's directory as ../beta-sweep[-quick]/summary.csv) or found by running that sweep first;
each divergence is then re-run at its best beta with a second seed, and both seeds are reported."""

from __future__ import annotations

import csv
from pathlib import Path

from . import beta_sweep
from .common import make_config, plot, summary, train_run, write_report, write_table


def best_betas(sweep_csv: Path) -> dict[str, float]:
    best: dict[str, tuple[float, float]] = {}
    for r in csv.DictReader(open(sweep_csv)):
        beta, gold = float(r["beta"]), float(r["gold_final"])
        if beta > 0 and (r["divergence"] not in best or gold > best[r["divergence"]][1]):
            best[r["divergence"]] = (beta, gold)
    return {d: b for d, (b, _) in best.items()}


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None) -> Path:
    steps = steps or (2 if quick else 400)
    sweep_dir = out.parent / ("beta-sweep" + ("-quick" if quick else ""))
    if not (sweep_dir / "summary.csv").is_file():
        sweep_dir = out / "beta-sweep"
        beta_sweep.run(sweep_dir, quick=quick, threads=threads, steps=steps)
    betas = best_betas(sweep_dir / "summary.csv")
    sweep = {(r["divergence"], float(r["beta"])): r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    table = []
    for div, beta in betas.items():
        cfg = make_config(quick, threads, method="rocm", divergence=div, beta=beta, steps=steps, seed=1)
        s1 = summary(train_run(cfg, out / "runs" / f"{div}-beta{beta:g}-seed1"))
        s0 = sweep[(div, beta)]
        table.append({"divergence": div, "best_beta": beta, "gold_final_seed0": float(s0["gold_final"]),
                      "gold_final_seed1": s1["gold_final"], "gold_peak_seed1": s1["gold_peak"],
                      "proxy_final_seed1": s1["proxy_final"], "accuracy_final_seed1": s1["accuracy_final"],
                      "s_per_step_seed1": s1["s_per_step"]})
    t, _ = write_table(out, "summary", table, "Each divergence at its best beta (final gold, two seeds)",
                       [f"best beta taken from {sweep_dir / 'summary.csv'} (seed 0); seed 1 re-run here"])
    img = plot(out, "gold_by_divergence", {f"seed {s}": (list(range(len(table))), [r[f"gold_final_seed{s}"] for r in table]) for s in (0, 1)},
               "divergence (" + ", ".join(r["divergence"] for r in table) + ")", "final gold (eval)")
    return write_report(out, "divergences", quick, [t], [img])
