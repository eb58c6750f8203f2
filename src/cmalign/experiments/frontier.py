"""Every method on one gold-vs-divergence plane under the comparison protocol (experiments/protocol.py): how much
test gold does each buy for how far it moves from the base model?

The grid is compute-matched's (every method over lr x its own knob, the same steps x batch, no wall-clock cap),
each run scored at its end on 500 fresh test chains. The divergence is measured alike for every method, three ways
(training/evaluation.evaluate): `kl_to_base`, the per-step KL (per_dim, final-step floor) summed over the chain
between the tuned and the base consistency model (DDPO tunes the DDPM teacher on its DDIM chain, a different
process: it has none), `distance_to_base`, the L2 distance of each sample to the base model's sample from the same
noise, and `proxy_drop`, how much more the training proxy rose than the held-out proxy (over-fitting the proxy).

Reported: for every budget of every measure, each method's cell of best *validation* gold among the cells whose
validation divergence is within the budget, with its *test* gold and test divergence (95% intervals) and ROCM's
test-gold gap to it; every cell's test point on the three planes with its intervals.

Default size: 50 steps x batch 32, 24 runs, about 28 minutes for one seed on 2 cores (compute_matched's runs).
The grid is compute-matched's run for run (same configurations, validation every 10 steps included), so a frontier
whose runs/ folder holds compute-matched's finished runs (`cp -al results/compute-matched/runs results/frontier/`)
only scores them: a run is reused when its saved configuration equals the cell's (experiments/common.reusable).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from cmalign.experiments import compute_matched
from cmalign.experiments.common import saved_figure, seeded_train_runs, write_report, write_table
from cmalign.experiments.protocol import (bootstrap, chain_matrix, collect_runs, gap_intervals,
                                          metric_intervals, protocol_intervals, select, write_data)

MEASURES = {  # method-neutral distances from the base model -> their budgets
    "kl_to_base": (0.05, 0.1, 0.2, 0.5),  # per-step KL (per_dim, final-step floor) on the consistency chain
    "distance_to_base": (0.5, 1.0, 2.0, 4.0),  # L2 distance to the base model's sample from the same noise
    "proxy_drop": (0.25, 0.5, 1.0, 2.0),  # training-proxy gain minus held-out-proxy gain
}
LABELS = {"kl_to_base": "per-step KL to the base consistency model (sum over steps)",
          "distance_to_base": "L2 distance to the base sample (same noise)",
          "proxy_drop": "proxy gain - held-out proxy gain (over the base)"}
QUICK_ARMS = ("rocm", "dpok", "ddpo")  # a KL method, a policy-gradient one with a divergence, the teacher-chain one


def budget_intervals(rows: list[dict], chains: dict) -> list[dict]:
    """For every measure and budget: each method's validation-best cell within it, its test gold and test measure
    (95% intervals), and ROCM's test-gold gap to the others there. Quantities are named X@MEASURE<=BUDGET."""
    out = []
    for measure, budgets in MEASURES.items():
        for budget in budgets:
            chosen = select(rows, within=(f"val_{measure}", budget))
            suffix = f"@{measure}<={budget:g}"
            out += metric_intervals(chains, chosen, {"test_gold": "gold", f"test_{measure}": measure}, suffix)
            out += gap_intervals(chains, chosen, "rocm", ("test_gold",), suffix)
    return out


def budget_table(intervals: list[dict]) -> list[dict]:
    """A markdown-friendly row per (measure, budget, method) from the budget intervals: test gold [lo, hi]."""
    text = lambda r: f"{r['estimate']:.4g} [{r['lo']:.4g}, {r['hi']:.4g}]"  # noqa: E731
    rows: dict[tuple, dict] = {}
    for r in intervals:
        if "@" not in r["quantity"] or r["versus"]:
            continue
        name, _, where = r["quantity"].partition("@")
        row = rows.setdefault((where, r["method"]), {"budget": where, "method": r["method"]})
        row["test_gold" if name == "test_gold" else "test_divergence"] = text(r)
    return list(rows.values())


def cell_points(rows: list[dict], chains: dict, measure: str) -> list[dict]:
    """Every cell's test point on one plane: seed-mean test gold and measure, each with its 95% interval."""
    points = []
    for arm, cell in dict.fromkeys((a, c) for a, c, _ in chains):
        x, y = chain_matrix(chains, arm, cell, measure), chain_matrix(chains, arm, cell, "gold")
        if x is not None and y is not None and np.isfinite(x).all():
            points.append({"method": arm, "cell": cell, "x": bootstrap([x]), "y": bootstrap([y])})
    return points


def plane(out: Path, measure: str, points: list[dict]) -> Path:
    """Test gold against a divergence measure, a point per cell with its 95% intervals, a colour per method."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(p["method"] for p in points))}
    labelled = set()
    for p in points:
        (x, xlo, xhi), (y, ylo, yhi) = p["x"], p["y"]
        label = None if p["method"] in labelled else p["method"]  # one legend entry per method
        labelled.add(p["method"])
        ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o", ms=3, lw=0.8,
                    color=colors[p["method"]], label=label)
    if measure != "proxy_drop":
        ax.set_xscale("symlog", linthresh=1e-3 if measure == "kl_to_base" else 1e-2)
    return saved_figure(fig, ax, out / f"gold_vs_{measure}.png", LABELS[measure] + " (test)", "test gold (seed mean, 95% intervals)")


def grid(out: Path, quick: bool, threads: int, steps: int | None, arms=None) -> tuple[int, dict]:
    """(steps, the cells of every arm's tuning grid): compute-matched's, fewer arms in quick mode."""
    return compute_matched.grid(out, quick, threads, steps, arms or (QUICK_ARMS if quick else None))


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        arms=None) -> Path:
    steps, cells = grid(out, quick, threads, steps, arms)
    seeded = seeded_train_runs(cells, seeds, jobs)
    rows, chains, _ = collect_runs(cells, seeded)
    intervals, _ = protocol_intervals(rows, chains, reference="rocm")
    budgets = budget_intervals(rows, chains)
    parts = write_data(out, rows, intervals + budgets, f"{steps} steps x batch, every method over lr x its knob, {seeds} seed(s)",
                       ["no wall-clock cap; test_kl_to_base is empty for ddpo (its DDIM chain is the teacher's, not the "
                        "consistency chain)", "X@MEASURE<=B in intervals: the method's cell of best validation gold among "
                        "those of validation MEASURE <= B; gap_...: ROCM's selected cell there minus the method's"])
    t_b, _ = write_table(out, "budgets", budget_table(budgets), "Test gold of each method's best cell within a divergence budget",
                         ["the cell is chosen on the validation chains (gold, among cells with validation divergence within "
                          "the budget); test gold and test divergence: mean over seeds of the test-chain means, [95% interval]"])
    imgs = [plane(out, m, cell_points(rows, chains, m)) for m in MEASURES]
    return write_report(out, "frontier", quick, [t_b, *parts], imgs,
                        ["Each point is one cell (a method at one lr and knob value) scored on the test chains; bars: 95% "
                         "intervals over seeds and chains. budgets.md reads the selection off the validation chains.", ""])
