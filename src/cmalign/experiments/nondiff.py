"""Non-differentiable rewards: hybrid ROCM (score-function term through the chain's step Gaussians,
methods/hybrid.py) against RLCM and DDPO, all trained on `rating` (the proxy quantised to 1..5 stars,
rewards/digits_rating.py) and judged on gold; ROCM on the differentiable proxy is the reference line.
Compute-matched as compute-matched is: the same samples (steps x batch) and the same train wall-clock
budget per run, every method at every learning rate of one small grid. Reported: gold at the start,
peak and end of training on the fixed evaluation set, the gain over the base model and the drop from
the peak (collapse), per run and for each method at its best learning rate."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import eval_rows, make_config, mean_curve, mean_std, plot, seeded_train_runs, wall, write_report, write_table

VARIANTS = {
    "rocm-hybrid": dict(method="rocm", beta=6.0, reward_weights={"rating": 1.0}),
    "rlcm": dict(method="rlcm", beta=0.0, reward_weights={"rating": 1.0}),
    "ddpo": dict(method="ddpo", beta=0.0, reward_weights={"rating": 1.0}),
    "rocm-proxy": dict(method="rocm", beta=6.0, reward_weights={"proxy": 1.0}),  # the differentiable reference line
}
LRS = (1e-4, 1e-3)
BUDGET_S = 50.0  # 50 steps of every method but DDPO (whose 20-step chain uses it all) fit in it on 2 busy cores


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        lrs=LRS, budget_s: float | None = None, variants=None) -> Path:
    steps = steps or (2 if quick else 50)
    budget_s = budget_s or (60.0 if quick else BUDGET_S)
    lrs = lrs[-1:] if quick and lrs is LRS else lrs  # quick: one lr of the grid (the test-suite's time budget)
    cells = {(name, lr): (make_config(quick, threads, lr=lr, steps=steps, max_train_seconds=budget_s, **VARIANTS[name]),
                          out / "runs" / f"{name}-lr{lr:g}") for name in variants or VARIANTS for lr in lrs}
    seeded = seeded_train_runs(cells, seeds, jobs)
    curves = {key: mean_curve(rows) for key, rows in seeded.items()}
    table = []
    for (name, lr), curve in curves.items():
        finals = [eval_rows(rows)[-1] for rows in seeded[(name, lr)]]
        gold_final, gold_final_sd = mean_std([f["eval_gold"] for f in finals])
        start, peak = curve[0]["gold"], max(r["gold"] for r in curve)
        table.append({"method": name, "reward": "+".join(VARIANTS[name]["reward_weights"]), "lr": lr, "seeds": seeds,
                      "steps_done": min(rows[-1]["step"] for rows in seeded[(name, lr)]),
                      "train_s": round(sum(wall(rows[-1]) for rows in seeded[(name, lr)]) / seeds, 1),
                      "reward_start": round(curve[0]["proxy"], 4), "reward_final": round(curve[-1]["proxy"], 4),
                      "gold_start": round(start, 4), "gold_peak": round(peak, 4),
                      "gold_final": gold_final, "gold_final_sd": gold_final_sd,
                      "gain_final": round(gold_final - start, 4), "drop_from_peak": round(peak - gold_final, 4) + 0.0,  # (no "-0")
                      "accuracy_final": round(sum(f.get("eval_accuracy", float("nan")) for f in finals) / seeds, 4)})
    best = []
    for name in dict.fromkeys(r["method"] for r in table):
        rows = [r for r in table if r["method"] == name]
        top = max(rows, key=lambda r: r["gain_final"])
        best.append({"method": name, "best_lr": top["lr"], "gain_final": top["gain_final"],
                     "gain_peak": round(top["gold_peak"] - top["gold_start"], 4), "drop_from_peak": top["drop_from_peak"],
                     "worst_lr_gain_final": min(r["gain_final"] for r in rows)})
    t1, _ = write_table(out, "summary", table,
                        f"Matched samples ({steps} steps x batch) and wall-clock (max {budget_s:g} train s per run), lr grid "
                        f"{', '.join(f'{x:g}' for x in lrs)}",
                        ["reward_*: the run's own training reward on the fixed evaluation chains (rating: 1..5 stars; "
                         "rocm-proxy: the proxy)", "gain_final: final gold minus the base model's (step 0); "
                         "drop_from_peak: peak minus final gold (collapse)",
                         "policy-gradient methods make ppo_epochs x ppo_minibatches updates per step; rocm one"])
    t2, _ = write_table(out, "best", best, "Each method at its best learning rate (by final gold gain)")
    trace = [{"method": n, "lr": lr, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
             for (n, lr), curve in curves.items() for r in curve]
    t3, _ = write_table(out, "trace", trace, "Gold over training (seed mean)")
    label = lambda n, lr: f"{n} lr={lr:g}"  # noqa: E731
    imgs = [plot(out, "gold_vs_time", {label(*k): ([r["wall_time"] for r in c], [r["gold"] for r in c]) for k, c in curves.items()},
                 "train seconds", "gold (eval, seed mean)"),
            plot(out, "gold_vs_samples", {label(*k): ([r["samples"] for r in c], [r["gold"] for r in c]) for k, c in curves.items()},
                 "samples", "gold (eval, seed mean)")]
    return write_report(out, "nondiff", quick, [t2, t1, t3], imgs)
