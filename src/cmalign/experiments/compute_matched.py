"""ROCM against the baselines under the comparison protocol (experiments/protocol.py): every method gets the same
samples (steps x batch) and the same tuning grid, lr {1e-4, 1e-3} x two values of its own knob (ROCM beta, DPOK
beta, D3PO's DPO temperature, RLCM/DDPO PPO clip, DRaFT backprop steps), with no wall-clock cap; each method's
cell of best final validation gold is compared on 500 fresh test chains, with 95% intervals for each method's test
scores, ROCM's gap to each baseline and ROCM's speed ratios to it (train seconds, seconds per step, and seconds to
the baseline's own best validation gold, seed by seed).

Default size: 50 steps x batch 32 = 1,600 samples a run, 6 methods x 4 cells = 24 runs, two at a time with one
thread each. Measured on 2 cores (2026-12-07, `results/compute-matched/`): median seconds per step ROCM 0.58,
RLCM 1.1-1.3, DDPO 8.0-8.5 on its 20-step DDIM chain, DRaFT-1 0.29, DPOK 1.9-2.1, D3PO 1.2-1.5; one seed takes
about 28 minutes, DDPO's four runs 58% of it. --steps changes the size for every method alike."""

from __future__ import annotations

import json
from pathlib import Path

from cmalign.experiments.common import seeded_train_runs, write_report, write_table
from cmalign.experiments.protocol import (METHOD_ARMS, collect_runs, grid_cells, protocol_intervals, selected_curve_plots,
                                          selected_keys, target_ratio_intervals, trace_rows, write_data)

STEPS = 50


def pretrain_cost(run_dir: Path, method: str) -> float | None:
    """Seconds of base-model pretraining behind this method (from the base manifest), or None."""
    from cmalign.config import load_preset
    from cmalign.worlds.digits.factory import pretrain_config_for
    from cmalign.worlds.digits import cache

    cfg = load_preset(str(run_dir / "config.yaml"))
    try:
        folder = cache.locate(pretrain_config_for(cfg), allow_pretrain=False)
        stats = json.loads((folder / "manifest.json").read_text()).get("stats", {})
    except Exception:
        return None
    teacher = stats.get("teacher_seconds")
    if teacher is None:
        return None
    return float(teacher) if method == "ddpo" else float(teacher) + float(stats.get("distill_seconds") or 0.0)


def grid(out: Path, quick: bool, threads: int, steps: int | None, arms=None) -> tuple[int, dict]:
    """(steps, the cells of every arm's tuning grid) of this experiment."""
    steps = steps or (2 if quick else STEPS)
    return steps, grid_cells({a: METHOD_ARMS[a] for a in arms or METHOD_ARMS}, out, quick, threads, steps)


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        arms=None) -> Path:
    steps, cells = grid(out, quick, threads, steps, arms)
    seeded = seeded_train_runs(cells, seeds, jobs)
    rows, chains, keys = collect_runs(cells, seeded)
    intervals, selected = protocol_intervals(rows, chains, reference="rocm")
    chosen = selected_keys(selected, keys)
    intervals += target_ratio_intervals(seeded, chosen, "rocm")
    costs = {arm: pretrain_cost(cells[key][1] / "seed0", METHOD_ARMS[arm]["method"]) for arm, key in chosen.items()}
    parts = write_data(out, rows, intervals, f"{steps} steps x batch, every method over lr x its knob, {seeds} seed(s)", [
        "no wall-clock cap; policy-gradient methods make ppo.epochs x ppo.minibatches updates per step, ROCM/DRaFT one",
        "base-model pretraining (s, from its manifest; consistency methods: teacher + distillation, DDPO: teacher): "
        + ", ".join(f"{a} {c:.0f}" if c is not None else f"{a} –" for a, c in costs.items())])
    t_trace, _ = write_table(out, "trace", trace_rows(seeded), "Validation gold over training (every run)")
    imgs = selected_curve_plots(out, seeded, chosen)
    return write_report(out, "compute-matched", quick, [*parts, t_trace], imgs)
