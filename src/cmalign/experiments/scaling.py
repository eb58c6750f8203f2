"""Scaling: how ROCM's speed advantage over RLCM changes with the problem's size. For each
(resolution, K) ROCM (KL, beta 3) and RLCM train with the same samples at each learning rate of a
small grid; the ratio is ROCM's train seconds to first reach RLCM's best gold over RLCM's seconds to
reach it, both at RLCM's default lr (1e-4) and with each method at its fastest lr of the grid.
The paper's speed claim concerns 16k-dimensional latents; here the action is 64 (8x8) or 256
(16x16) pixels per step, so the question is only whether the ratio falls as d grows.

The 16x16 base model uses a shorter recipe than the 8x8 default (1,500 teacher and 600 distillation
updates, 37 min on one core) and ships with the package in float16 like the 8x8 one (`cmalign pretrain
digits --resolution 16 --teacher-steps 1500 --distill-steps 600` rebuilds it); the first 16x16 run builds
that resolution's proxy (2,000 gold pairs, about a minute)."""

from __future__ import annotations

from pathlib import Path

from .common import first_reaching, make_config, mean_curve, plot, seeded_train_runs, summary, wall, write_report, write_table

SETTINGS = ((8, 2), (8, 4), (8, 8), (16, 4))  # (resolution, K)
QUICK_SETTINGS = ((8, 2), (16, 2))
LRS = (1e-4, 1e-3)
PRETRAIN_16 = dict(pretrain_teacher_steps=1500, pretrain_distill_steps=600)
EVAL_SIZE = 100  # fixed evaluation chains every 10 steps (200 elsewhere; with 200 the default took 20.7 min on 2 cores)


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        lrs=LRS, settings=None) -> Path:
    steps = steps or (2 if quick else 150)
    settings = settings or (QUICK_SETTINGS if quick else SETTINGS)
    cells = {(res, k, method, lr): (make_config(quick, threads, method=method, beta=3.0 if method == "rocm" else 0.0, lr=lr,
                                                steps=steps, num_steps=k, digits_resolution=res,
                                                **({} if quick else {"eval_size": EVAL_SIZE}), **({} if (quick or res == 8) else PRETRAIN_16)),
                                    out / "runs" / f"r{res}-k{k}-{method}-lr{lr:g}")
             for res, k in settings for method in ("rocm", "rlcm") for lr in lrs}
    seeded = seeded_train_runs(cells, seeds, jobs)
    default_lr = min(lrs, key=lambda lr: abs(lr - 1e-4))
    table, curves = [], {}
    for res, k in settings:
        mean = {(m, lr): mean_curve(seeded[(res, k, m, lr)]) for m in ("rocm", "rlcm") for lr in lrs}
        for (method, lr), c in mean.items():
            curves[f"{method} {res}x{res} K={k} lr={lr:g}"] = ([r["wall_time"] for r in c], [r["gold"] for r in c])
        tuned_lr = max(lrs, key=lambda lr: max(r["gold"] for r in mean[("rlcm", lr)]))
        row = {"resolution": res, "K": k, "action_dim": res * res, "seeds": seeds, "gold_start": round(mean[("rocm", default_lr)][0]["gold"], 4)}
        for label, rlcm_lr in (("default", default_lr), ("tuned", tuned_lr)):
            # ROCM at the same lr for "default"; at its fastest lr of the grid for "tuned"
            rocm_lrs = [default_lr] if label == "default" else list(lrs)
            ratio, target, rlcm_s, rocm_s, rocm_lr = time_ratio(mean[("rlcm", rlcm_lr)], {lr: mean[("rocm", lr)] for lr in rocm_lrs})
            row.update({f"{label}_rlcm_lr": rlcm_lr, f"{label}_rlcm_best_gold": round(target, 4), f"{label}_rlcm_s": round(rlcm_s, 1),
                        f"{label}_rocm_lr": rocm_lr, f"{label}_rocm_s": round(rocm_s, 1) if rocm_s is not None else None,
                        f"{label}_ratio": ratio})
            if seeds > 1:  # the same ratio seed by seed (each seed's own RLCM target)
                one = lambda m, lr, s: mean_curve([seeded[(res, k, m, lr)][s]])  # noqa: E731
                per_seed = [time_ratio(one("rlcm", rlcm_lr, s), {lr: one("rocm", lr, s) for lr in rocm_lrs})[0] for s in range(seeds)]
                row[f"{label}_ratio_per_seed"] = " / ".join("–" if r is None else f"{r:.2f}" for r in per_seed)
        for (method, lr), c in mean.items():
            row[f"{method}_lr{lr:g}_gold_final"] = round(c[-1]["gold"], 4)
            row[f"{method}_lr{lr:g}_accuracy_final"] = round(c[-1]["accuracy"], 4)
        for method in ("rocm", "rlcm"):
            row[f"{method}_s_per_step"] = summary(seeded[(res, k, method, default_lr)][0])["s_per_step"]
        table.append(row)
    t, _ = write_table(out, "summary", table, f"ROCM vs RLCM over resolution and K ({steps} steps x batch, lr grid {', '.join(f'{x:g}' for x in lrs)})",
                       ["X_ratio: ROCM's train seconds to RLCM's best eval gold / RLCM's seconds to it (– never reached), on the seed-mean "
                        "curves; default: both at lr 1e-4; tuned: RLCM at its best lr (highest gold), ROCM at its fastest lr",
                        "evaluation every eval_every steps bounds the time resolution; s_per_step: seed 0 at the default lr",
                        "ROCM: KL, beta 3, one update per step; RLCM: PPO, 2 epochs x 2 minibatches = 4 updates per step"])
    img = plot(out, "gold_vs_time", curves, "train seconds", "gold (eval, seed mean)")
    return write_report(out, "scaling", quick, [t], [img])


def time_ratio(rlcm: list[dict], rocm: dict[float, list[dict]]):
    """(ratio, target, rlcm_s, rocm_s, rocm_lr) on gold curves (mean_curve rows): ROCM's fastest seconds,
    over the lrs given, to RLCM's best gold over RLCM's own seconds to it (None where ROCM never gets there)."""
    target = max(r["gold"] for r in rlcm)
    rlcm_s = wall(first_reaching(rlcm, target, "gold"))
    reach = [(wall(r), lr) for lr, c in rocm.items() if (r := first_reaching(c, target, "gold"))]
    rocm_s, rocm_lr = min(reach) if reach else (None, None)
    return (round(rocm_s / max(rlcm_s, 1e-9), 3) if rocm_s is not None else None), target, rlcm_s, rocm_s, rocm_lr
