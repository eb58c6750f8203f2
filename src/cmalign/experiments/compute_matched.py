"""ROCM against the baselines at matched compute: every run gets the same samples (steps x batch)
and the same wall-clock budget (max_train_seconds), whichever ends first, and each method is run at
every learning rate of one small grid. Gold on the fixed evaluation set (mean over seeds) is reported
against train wall-clock and samples, and as the time each method needs to first reach RLCM's best
gold, for RLCM at its default lr (1e-4) and at its best lr of the grid; also with the base model's
pretraining charged (consistency methods: teacher + distillation; DDPO: teacher only)."""

from __future__ import annotations

import json
from pathlib import Path

from cmalign.experiments.common import eval_rows, first_reaching, make_config, mean_curve, mean_std, plot, seeded_train_runs, wall, write_report, write_table

# name -> method settings; ROCM at its default beta (6) and at the beta of the hacking experiment (3)
VARIANTS = {
    "rocm": dict(method="rocm", beta=6.0),
    "rocm-beta3": dict(method="rocm", beta=3.0),
    "rlcm": dict(method="rlcm", beta=0.0),
    "ddpo": dict(method="ddpo", beta=0.0),
    "draft": dict(method="draft", beta=0.0),
    "dpok": dict(method="dpok", beta=0.1),
    "d3po": dict(method="d3po", beta=10.0),  # DPO temperature: a 60-step pilot, 1 / 10 / 100, took the middle
}
LRS = (1e-4, 1e-3)
BUDGET_S = 200.0  # DDPO's 20-step chain uses it all; every other method ends on its samples


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


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        lrs=LRS, budget_s: float | None = None, variants=None) -> Path:
    steps = steps or (2 if quick else 150)
    budget_s = budget_s or (60.0 if quick else BUDGET_S)
    cells = {(name, lr): (make_config(quick, threads, lr=lr, steps=steps, max_train_seconds=budget_s, **VARIANTS[name]),
                          out / "runs" / f"{name}-lr{lr:g}") for name in variants or VARIANTS for lr in lrs}
    seeded = seeded_train_runs(cells, seeds, jobs)
    runs = {key: (seeded[key], run_dir / "seed0") for key, (_, run_dir) in cells.items()}
    curves = {key: mean_curve(seed_rows) for key, seed_rows in seeded.items()}
    rlcm_lrs = [lr for (n, lr) in curves if n == "rlcm"]
    rlcm_best = {lr: max(r["gold"] for r in curves[("rlcm", lr)]) for lr in rlcm_lrs}
    tuned_lr = max(rlcm_best, key=rlcm_best.get)
    default_lr = min(rlcm_lrs, key=lambda lr: abs(lr - 1e-4))
    targets = {"rlcm_default": (default_lr, rlcm_best[default_lr]), "rlcm_tuned": (tuned_lr, rlcm_best[tuned_lr])}
    rlcm_s = {k: wall(first_reaching(curves[("rlcm", lr)], g, "gold")) for k, (lr, g) in targets.items()}
    table = []
    for (name, lr), curve in curves.items():
        seed_runs, run_dir0 = runs[(name, lr)]
        finals = [eval_rows(rows)[-1] for rows in seed_runs]
        gold_final, gold_final_sd = mean_std([f["eval_gold"] for f in finals])
        row = {"method": name, "lr": lr, "seeds": seeds, "steps_done": min(rows[-1]["step"] for rows in seed_runs),
               "samples": min(rows[-1].get("samples", 0) for rows in seed_runs),
               "train_s": round(sum(wall(rows[-1]) for rows in seed_runs) / seeds, 1),
               "gold_start": round(curve[0]["gold"], 4), "gold_peak": round(max(r["gold"] for r in curve), 4),
               "gold_final": gold_final, "gold_final_sd": gold_final_sd,
               "accuracy_final": round(sum(f.get("eval_accuracy", float("nan")) for f in finals) / seeds, 4)}
        cost = pretrain_cost(run_dir0, VARIANTS[name]["method"])
        for key, (_, target) in targets.items():
            reach = first_reaching(curve, target, "gold")
            row[f"s_to_{key}"] = round(wall(reach), 1) if reach else None
            row[f"ratio_to_{key}"] = round(wall(reach) / rlcm_s[key], 3) if reach and rlcm_s[key] else None
        reach = first_reaching(curve, targets["rlcm_tuned"][1], "gold")
        row["pretrain_s"] = round(cost, 1) if cost is not None else None
        row["s_to_rlcm_tuned_with_pretrain"] = round(wall(reach) + cost, 1) if (reach and cost is not None) else None
        table.append(row)
    t, _ = write_table(out, "summary", table,
                       f"Matched samples ({steps} steps x batch) and wall-clock (max {budget_s:g} train s per run), lr grid {', '.join(f'{x:g}' for x in lrs)}",
                       [f"targets: RLCM's best eval gold (seed mean) at lr {default_lr:g}: {targets['rlcm_default'][1]:.4f} "
                        f"(reached in {rlcm_s['rlcm_default']:.1f} s); at its best lr {tuned_lr:g}: {targets['rlcm_tuned'][1]:.4f} "
                        f"(reached in {rlcm_s['rlcm_tuned']:.1f} s)",
                        "s_to_X: train seconds (evaluation excluded) of the seed-mean curve to first reach target X; – never; "
                        "ratio_to_X: that over RLCM's own seconds to it",
                        "gold_final: mean over seeds (± gold_final_sd); steps_done < steps: the wall-clock budget ended the run",
                        "pretrain_s: the base model's recorded pretraining seconds (teacher + distillation; DDPO: teacher)",
                        "policy-gradient methods make ppo_epochs x ppo_minibatches updates per step; ROCM/DRaFT one"])
    trace = [{"method": n, "lr": lr, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
             for (n, lr), curve in curves.items() for r in curve]
    t2, _ = write_table(out, "trace", trace, "Gold over training (seed mean)")
    label = lambda n, lr: f"{n} lr={lr:g}"  # noqa: E731
    imgs = [plot(out, "gold_vs_time", {label(*k): ([r["wall_time"] for r in c], [r["gold"] for r in c]) for k, c in curves.items()},
                 "train seconds", "gold (eval, seed mean)"),
            plot(out, "gold_vs_samples", {label(*k): ([r["samples"] for r in c], [r["gold"] for r in c]) for k, c in curves.items()},
                 "samples", "gold (eval, seed mean)")]
    return write_report(out, "compute-matched", quick, [t, t2], imgs)
