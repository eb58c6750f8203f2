"""ROCM's beta sweep per divergence: final and peak gold over a log grid of beta (the sweet spot)."""

from __future__ import annotations

from pathlib import Path

from .common import make_config, plot, summary, train_run, write_report, write_table

DIVERGENCES = ("kl", "js", "hellinger", "fisher")
BETAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None,
        divergences=DIVERGENCES, betas=None) -> Path:
    steps = steps or (2 if quick else 400)
    betas = betas or ((0.0, 3.0) if quick else BETAS)
    table, zero = [], None
    for div in divergences:
        for beta in betas:
            if beta == 0 and zero is not None:  # beta = 0 is the same run for every divergence
                table.append({**zero, "divergence": div})
                continue
            cfg = make_config(quick, threads, method="rocm", divergence=div, beta=beta, steps=steps)
            row = {"divergence": div, "beta": beta, **summary(train_run(cfg, out / "runs" / f"{div}-beta{beta:g}"))}
            if beta == 0:
                zero = row
            table.append(row)
    best = {}
    for r in table:
        if r["beta"] > 0 and (r["divergence"] not in best or r["gold_final"] > best[r["divergence"]]["gold_final"]):
            best[r["divergence"]] = r
    t, _ = write_table(out, "summary", table, "Final gold against beta, per divergence",
                       ["beta = 0 is one run shown under each divergence",
                        "best beta (final gold): " + ", ".join(f"{d}: {r['beta']:g} ({r['gold_final']:.3f})" for d, r in best.items())])
    img = plot(out, "gold_vs_beta", {d: ([r["beta"] for r in table if r["divergence"] == d],
                                         [r["gold_final"] for r in table if r["divergence"] == d]) for d in divergences},
               "beta", "final gold (eval)", logx=True)
    return write_report(out, "beta-sweep", quick, [t], [img])
