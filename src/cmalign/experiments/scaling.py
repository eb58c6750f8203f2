"""Scaling: how ROCM's speed advantage over RLCM changes with the problem's size. For each
(resolution, K) ROCM (KL, beta 3) and RLCM train with the same samples at each learning rate of a
small grid; the ratio is ROCM's train seconds to first reach RLCM's best gold over RLCM's seconds to
reach it, both at RLCM's default lr (1e-4) and with each method at its fastest lr of the grid.
The paper's speed claim concerns 16k-dimensional latents; here the action is 64 (8x8) or 256
(16x16) pixels per step, so the question is only whether the ratio falls as d grows.

The 16x16 base model uses a shorter recipe than the 8x8 default (1,500 teacher and 600 distillation
updates, 37 min on one core) and ships with the package in float16 like the 8x8 one (`cmalign pretrain
digits --resolution 16 --teacher-steps 1500 --distill-steps 600` rebuilds it); the first 16x16 run builds
that resolution's proxy (2,000 gold pairs, about a minute).

Over intrinsic dimension (`cmalign experiment scaling-grid`, run_grid below): upsampling keeps 64 degrees of
freedom, so the honest axis is the compositional digits grid (worlds/digits_grid.py): N x N independent 8x8
digits, 64 N² dimensions, N = 1, 2, 3 at K = 2. Beside the time ratio above it reports a frontier-based one:
ROCM's seconds to RLCM's best gold at no larger KL to the base model (eval_kl_to_base, the frontier
experiment's measure) than RLCM had there, over RLCM's seconds."""

from __future__ import annotations

import math
from pathlib import Path

from cmalign.experiments.common import first_reaching, make_config, mean_curve, plot, seeded_train_runs, summary, wall, write_report, write_table
from cmalign.experiments.frontier import peak, seed_mean_points, time_to

SETTINGS = ((8, 2), (8, 4), (8, 8), (16, 4))  # (resolution, K)
QUICK_SETTINGS = ((8, 2), (16, 2))
LRS = (1e-4, 1e-3)
PRETRAIN_16 = {"digits.pretrain_teacher_steps": 1500, "digits.pretrain_distill_steps": 600}
EVAL_SIZE = 100  # fixed evaluation chains every 10 steps (200 elsewhere; with 200 the default took 20.7 min on 2 cores)


# (resolution, K, grid N): 64, 256, 576 dimensions. K = 2 (one stochastic step and the final one) keeps the 12 runs
# of a seed at 15 minutes on 2 cores (17 with the first build of the grid proxies; K = 4 would take ~45): a 3x3
# grid step costs several 8x8 steps, and the axis here is N, not K
GRID_SETTINGS = ((8, 2, 1), (8, 2, 2), (8, 2, 3))
QUICK_GRID_SETTINGS = ((8, 2, 1), (8, 2, 2))
QUICK_GRID = {"digits.pretrain_teacher_steps": 20, "digits.pretrain_distill_steps": 10, "digits.proxy_pairs": 80}  # the tiny grid models


def _cell_config(quick, threads, method, lr, steps, res, k, grid):
    extra = {} if quick else {"eval_size": EVAL_SIZE}
    if grid > 1:
        extra.update({"digits.grid": grid, **(QUICK_GRID if quick else {})})
    elif not quick and res != 8:
        extra.update(PRETRAIN_16)
    return make_config(quick, threads, method=method, beta=3.0 if method == "rocm" else 0.0, lr=lr, steps=steps, num_steps=k,
                       **{"digits.resolution": res}, **extra)


def _setting_row(seeded: dict, setting: tuple, lrs, seeds: int, default_lr: float, over_grid: bool) -> tuple[dict, dict]:
    """The summary row of one (resolution, K, grid) setting, and its seed-mean gold curves by label."""
    res, k, g = setting
    mean = {(m, lr): mean_curve(seeded[(res, k, g, m, lr)]) for m in ("rocm", "rlcm") for lr in lrs}
    side = res * g
    curves = {f"{method} {side}x{side}{f' (grid {g})' if g > 1 else ''} K={k} lr={lr:g}": ([r["wall_time"] for r in c], [r["gold"] for r in c])
              for (method, lr), c in mean.items()}
    tuned_lr = max(lrs, key=lambda lr: max(r["gold"] for r in mean[("rlcm", lr)]))
    row = {"resolution": res, "K": k, **({"grid": g} if over_grid else {}), "action_dim": side * side if g > 1 else res * res,
           "seeds": seeds, "gold_start": round(mean[("rocm", default_lr)][0]["gold"], 4)}
    for label, rlcm_lr in (("default", default_lr), ("tuned", tuned_lr)):
        # ROCM at the same lr for "default"; at its fastest lr of the grid for "tuned"
        rocm_lrs = [default_lr] if label == "default" else list(lrs)
        ratio, target, rlcm_s, rocm_s, rocm_lr = time_ratio(mean[("rlcm", rlcm_lr)], {lr: mean[("rocm", lr)] for lr in rocm_lrs})
        row.update({f"{label}_rlcm_lr": rlcm_lr, f"{label}_rlcm_best_gold": round(target, 4), f"{label}_rlcm_s": round(rlcm_s, 1),
                    f"{label}_rocm_lr": rocm_lr, f"{label}_rocm_s": round(rocm_s, 1) if rocm_s is not None else None,
                    f"{label}_ratio": ratio})
        if seeds > 1:  # the same ratio seed by seed (each seed's own RLCM target)
            one = lambda m, lr, s: mean_curve([seeded[(res, k, g, m, lr)][s]])  # noqa: E731
            per_seed = [time_ratio(one("rlcm", rlcm_lr, s), {lr: one("rocm", lr, s) for lr in rocm_lrs})[0] for s in range(seeds)]
            row[f"{label}_ratio_per_seed"] = " / ".join("–" if r is None else f"{r:.2f}" for r in per_seed)
    if over_grid:
        row.update(_frontier_columns(seeded, setting, lrs, seeds, tuned_lr))
    for (method, lr), c in mean.items():
        row[f"{method}_lr{lr:g}_gold_final"] = round(c[-1]["gold"], 4)
        row[f"{method}_lr{lr:g}_accuracy_final"] = round(c[-1]["accuracy"], 4)
    for method in ("rocm", "rlcm"):
        row[f"{method}_s_per_step"] = summary(seeded[(res, k, g, method, default_lr)][0])["s_per_step"]
    return row, curves


def _frontier_columns(seeded: dict, setting: tuple, lrs, seeds: int, tuned_lr: float) -> dict:
    """The frontier-based ratio: RLCM's best gold at no larger KL to the base model."""
    res, k, g = setting
    pts = {(m, lr): seed_mean_points(seeded[(res, k, g, m, lr)]) for m in ("rocm", "rlcm") for lr in lrs}
    ratio, target, kl = frontier_ratio(pts[("rlcm", tuned_lr)], [pts[("rocm", lr)] for lr in lrs])
    out = dict(frontier_rlcm_gold=round(target, 4), frontier_rlcm_kl=round(kl, 4) if math.isfinite(kl) else None,
               frontier_ratio=ratio)
    if seeds > 1:
        per_seed = []
        for s in range(seeds):
            one_pts = lambda m, lr: seed_mean_points([seeded[(res, k, g, m, lr)][s]])  # noqa: E731
            per_seed.append(frontier_ratio(one_pts("rlcm", tuned_lr), [one_pts("rocm", lr) for lr in lrs])[0])
        out["frontier_ratio_per_seed"] = " / ".join("–" if r is None else f"{r:.2f}" for r in per_seed)
    return out


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        lrs=None, settings=None) -> Path:
    steps = steps or (2 if quick else 150)
    # quick mode checks the plumbing: one lr halves its runs (the tables' logic is the same)
    lrs = lrs or ((1e-3,) if quick else LRS)
    settings = [s if len(s) == 3 else (*s, 1) for s in (settings or (QUICK_SETTINGS if quick else SETTINGS))]
    over_grid = any(g > 1 for _, _, g in settings)
    name = lambda res, k, g: f"r{res}-k{k}" if g == 1 else f"grid{g}-k{k}"  # noqa: E731  (the 8x8 runs keep their folders)
    cells = {(res, k, g, method, lr): (_cell_config(quick, threads, method, lr, steps, res, k, g),
                                       out / "runs" / f"{name(res, k, g)}-{method}-lr{lr:g}")
             for res, k, g in settings for method in ("rocm", "rlcm") for lr in lrs}
    seeded = seeded_train_runs(cells, seeds, jobs)
    default_lr = min(lrs, key=lambda lr: abs(lr - 1e-4))
    table, curves = [], {}
    for res, k, g in settings:
        row, setting_curves = _setting_row(seeded, (res, k, g), lrs, seeds, default_lr, over_grid)
        table.append(row)
        curves.update(setting_curves)
    axis = "intrinsic dimension (digits grid N x N)" if over_grid else "resolution and K"
    notes = ["X_ratio: ROCM's train seconds to RLCM's best eval gold / RLCM's seconds to it (– never reached), on the seed-mean "
             "curves; default: both at lr 1e-4; tuned: RLCM at its best lr (highest gold), ROCM at its fastest lr",
             "evaluation every eval_every steps bounds the time resolution; s_per_step: seed 0 at the default lr",
             "ROCM: KL, beta 3, one update per step; RLCM: PPO, 2 epochs x 2 minibatches = 4 updates per step"]
    if over_grid:
        notes += ["action_dim: 64 N² pixels, N² independent 8x8 digits (gold, accuracy per cell, averaged)",
                  "frontier_ratio: ROCM's fastest seconds (any lr) to RLCM's best gold (at its tuned lr) with eval_kl_to_base no "
                  "larger than RLCM's there, over RLCM's seconds to that point"]
    t, _ = write_table(out, "summary", table, f"ROCM vs RLCM over {axis} ({steps} steps x batch, lr grid {', '.join(f'{x:g}' for x in lrs)})",
                       notes)
    img = plot(out, "gold_vs_time", curves, "train seconds", "gold (eval, seed mean)")
    return write_report(out, "scaling-grid" if over_grid else "scaling", quick, [t], [img])


def run_grid(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int | None = None, jobs: int = 1,
             lrs=None, settings=None) -> Path:
    """ROCM vs RLCM over intrinsic dimension: the compositional digits grid at N = 1, 2, 3 (K = 2), one seed by
    default (`--seeds 2` then trains only the second; quick: tiny models, N = 1, 2, one lr)."""
    seeds = seeds or 1
    lrs = lrs or ((1e-4,) if quick else LRS)
    return run(out, quick, threads, steps, seeds, jobs, lrs, settings or (QUICK_GRID_SETTINGS if quick else GRID_SETTINGS))


def frontier_ratio(rlcm: list[dict], rocm: list[list[dict]]):
    """(ratio, target gold, KL budget) on frontier points (seed_mean_points rows): RLCM's best gold and its KL to the
    base there; ROCM's fewest seconds over its curves to a point with at least that gold and at most that KL, over
    RLCM's seconds (None where ROCM never gets there)."""
    best, kl, rlcm_s = peak(rlcm, "kl")
    times = [t for c in rocm if (t := time_to(c, "kl", kl, best["gold"])) is not None]
    ratio = round(min(times) / max(rlcm_s, 1e-9), 3) if times else None
    return ratio, best["gold"], kl


def time_ratio(rlcm: list[dict], rocm: dict[float, list[dict]]):
    """(ratio, target, rlcm_s, rocm_s, rocm_lr) on gold curves (mean_curve rows): ROCM's fastest seconds,
    over the lrs given, to RLCM's best gold over RLCM's own seconds to it (None where ROCM never gets there)."""
    target = max(r["gold"] for r in rlcm)
    rlcm_s = wall(first_reaching(rlcm, target, "gold"))
    reach = [(wall(r), lr) for lr, c in rocm.items() if (r := first_reaching(c, target, "gold"))]
    rocm_s, rocm_lr = min(reach) if reach else (None, None)
    return (round(rocm_s / max(rlcm_s, 1e-9), 3) if rocm_s is not None else None), target, rlcm_s, rocm_s, rocm_lr
