"""Reward hacking: ROCM at beta = 0 against beta = 3 (KL), proxy and gold on the fixed validation chains over
training, and both scored at the end on fresh test chains (experiments/protocol.py). Expected (lab prototype): at
beta = 0 gold peaks then collapses while the proxy keeps rising; at beta = 3 gold holds.

The default (one seed, 400 steps x batch 32, two runs at a time) takes about 5 minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import plot_bands, seed_band, seeded_train_runs, write_report, write_table
from cmalign.experiments.protocol import collect_runs, fixed_cells, protocol_intervals, trace_rows, write_data

ARMS = {"rocm-beta0": dict(method="rocm", beta=0.0), "rocm-beta3": dict(method="rocm", beta=3.0)}


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1) -> Path:
    steps = steps or (2 if quick else 400)
    cells = fixed_cells(ARMS, out, quick, threads, steps)
    seeded = seeded_train_runs(cells, seeds, jobs)
    rows, chains, _ = collect_runs(cells, seeded)
    intervals, _ = protocol_intervals(rows, chains, reference="rocm-beta3", timings=())
    parts = write_data(out, rows, intervals, f"ROCM at beta 0 and 3, {steps} steps, {seeds} seed(s)",
                       ["val_gold_peak: the highest validation gold during training (a collapse: val_gold well below it)"])
    t2, _ = write_table(out, "trace", trace_rows(seeded), "Proxy (reward) and gold over training (validation chains)")
    band = "line: seed mean; band: lowest to highest seed"
    imgs = [plot_bands(out, "gold", {arm: seed_band(runs, "step") for (arm, _), runs in seeded.items()}, "step", f"validation gold ({band})"),
            plot_bands(out, "proxy", {arm: seed_band(runs, "step", "eval_reward") for (arm, _), runs in seeded.items()}, "step",
                       f"validation proxy ({band})")]
    return write_report(out, "hacking", quick, [*parts, t2], imgs)
