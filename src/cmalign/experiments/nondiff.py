"""Non-differentiable rewards: hybrid ROCM (score-function term through the chain's step Gaussians,
methods/hybrid.py) against RLCM and DDPO, all trained on `rating` (the proxy quantised to 1..5 stars,
rewards/digits_rating.py) and judged on gold; ROCM on the differentiable proxy is the reference line.
Under the comparison protocol (experiments/protocol.py): every arm over lr x its method's knob (ROCM beta, PPO
clip), the same samples (steps x batch) and no wall-clock cap; each arm's cell of best final validation gold is
compared on 500 fresh test chains, with 95% intervals for its test scores, hybrid ROCM's gaps to the others and its
speed ratios (seconds per step, train seconds, and seconds to the other arm's own best validation gold).

Default size: 50 steps x batch 32, 4 arms x 4 cells = 16 runs, two at a time: one seed takes about 28 minutes on 2
cores (three took 84 min on 2026-12-07, `results/nondiff/`), over the 20-minute goal; DDPO's four runs (a median 9 s
a step on its 20-step DDIM chain, `s_per_step` in summary.csv) are most of it, as in compute-matched."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import seeded_train_runs, write_report, write_table
from cmalign.experiments.protocol import (collect_runs, grid_cells, protocol_intervals, selected_curve_plots, selected_keys,
                                          target_ratio_intervals, trace_rows, write_data)

ARMS = {
    "rocm-hybrid": dict(method="rocm", reward_weights={"rating": 1.0}),
    "rlcm": dict(method="rlcm", beta=0.0, reward_weights={"rating": 1.0}),
    "ddpo": dict(method="ddpo", beta=0.0, reward_weights={"rating": 1.0}),
    "rocm-proxy": dict(method="rocm", reward_weights={"proxy": 1.0}),  # the differentiable reference line
}
STEPS = 50


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        arms=None) -> Path:
    steps = steps or (2 if quick else STEPS)
    cells = grid_cells({a: ARMS[a] for a in arms or ARMS}, out, quick, threads, steps)
    seeded = seeded_train_runs(cells, seeds, jobs)
    rows, chains, keys = collect_runs(cells, seeded)
    # the reward each arm trains on, beside its settings
    rows = [{"method": r["method"], "reward": "+".join(ARMS[r["method"]]["reward_weights"]), **r} for r in rows]
    intervals, selected = protocol_intervals(rows, chains, reference="rocm-hybrid")
    chosen = selected_keys(selected, keys)
    intervals += target_ratio_intervals(seeded, chosen, "rocm-hybrid")
    parts = write_data(out, rows, intervals, f"Trained on the star rating, judged on gold: {steps} steps x batch, lr x knob, {seeds} seed(s)",
                       ["test_proxy here: the run's own training reward on the test chains (rating: 1..5 stars; rocm-proxy: "
                        "the proxy); no wall-clock cap",
                        "policy-gradient methods make ppo.epochs x ppo.minibatches updates per step; rocm one"])
    t_trace, _ = write_table(out, "trace", trace_rows(seeded), "Validation gold over training (every run)")
    imgs = selected_curve_plots(out, seeded, chosen)
    return write_report(out, "nondiff", quick, [*parts, t_trace], imgs)
