"""ROCM against the baselines at matched compute: every method gets the same number of samples
(steps x batch); gold on the fixed evaluation set is reported against train wall-clock and against
samples, at the common wall-clock budget (the shortest method's total time: each method's best gold
reached by then), and as the time each method needs to first reach RLCM's best gold, also with the
base model's pretraining cost charged (consistency methods: teacher + distillation; DDPO: teacher only)."""

from __future__ import annotations

from pathlib import Path

from .common import eval_rows, make_config, plot, summary, train_run, wall, write_report, write_table

METHODS = ("rocm", "rlcm", "ddpo", "draft", "dpok")


def pretrain_cost(run_dir: Path, method: str) -> float | None:
    """Seconds of base-model pretraining behind this method (from the base manifest), or None."""
    import json

    import yaml

    from ..config import TrainConfig
    from ..worlds import digits_base, digits_pretrain_config

    cfg = TrainConfig(**{k: v for k, v in yaml.safe_load((run_dir / "config.yaml").read_text()).items()
                         if k in TrainConfig.__dataclass_fields__})
    try:
        folder = digits_base.locate(digits_pretrain_config(cfg), allow_pretrain=False)
        stats = json.loads((folder / "manifest.json").read_text()).get("stats", {})
    except Exception:
        return None
    teacher = stats.get("teacher_seconds")
    distill = stats.get("distill_seconds")
    if teacher is None:
        return None
    return float(teacher) if method == "ddpo" else float(teacher) + float(distill or 0.0)


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, lr: float = 1e-4) -> Path:
    steps = steps or (2 if quick else 150)
    results = {}
    for method in METHODS:
        cfg = make_config(quick, threads, method=method, steps=steps, lr=lr,
                          beta=0.0 if method in ("rlcm", "ddpo", "draft") else (3.0 if method == "rocm" else 0.1))
        run_dir = out / "runs" / method
        results[method] = (train_run(cfg, run_dir), run_dir)
    budget = min(wall(rows[-1]) for rows, _ in results.values())
    target = max(r["eval_gold"] for r in eval_rows(results["rlcm"][0]))
    table = []
    for method, (rows, run_dir) in results.items():
        ev = eval_rows(rows)
        s = summary(rows)
        within = [r for r in ev if wall(r) <= budget + 1e-9]
        reach = next((r for r in ev if r["eval_gold"] >= target), None)
        cost = pretrain_cost(run_dir, method)
        table.append({
            "method": method, "samples": rows[-1].get("samples"), "train_s": s["train_s"], "s_per_step": s["s_per_step"],
            "gold_start": s["gold_start"], "gold_peak": s["gold_peak"], "gold_final": s["gold_final"],
            f"best_gold_within_{budget:.1f}s": round(max(r["eval_gold"] for r in within), 4),
            "proxy_final": s["proxy_final"], "accuracy_final": s["accuracy_final"],
            "s_to_rlcm_best": round(wall(reach), 2) if reach else None,
            "samples_to_rlcm_best": reach.get("samples", 0) if reach else None,
            "pretrain_s": round(cost, 1) if cost is not None else None,
            "s_to_rlcm_best_with_pretrain": round(wall(reach) + cost, 1) if (reach and cost is not None) else None,
        })
    t, _ = write_table(out, "summary", table, f"Matched samples ({steps} steps x batch), budget {budget:.1f} s",
                       [f"RLCM's best eval gold (the target): {target:.4f}",
                        "s_to_rlcm_best: train seconds (evaluation excluded) to the first evaluation at or above it; – never",
                        "pretrain_s: the base model's recorded pretraining seconds (teacher + distillation; DDPO: teacher)",
                        "policy-gradient methods make ppo_epochs x ppo_minibatches updates per step; ROCM/DRaFT one"])
    trace = [{"method": m, "step": r["step"], "samples": r.get("samples", 0), "wall_time": wall(r),
              "gold": round(r["eval_gold"], 4), "proxy": round(r["eval_reward"], 4)}
             for m, (rows, _) in results.items() for r in eval_rows(rows)]
    t2, _ = write_table(out, "trace", trace, "Gold over training")
    imgs = [plot(out, "gold_vs_time", {m: ([wall(r) for r in eval_rows(rows)], [r["eval_gold"] for r in eval_rows(rows)])
                                       for m, (rows, _) in results.items()}, "train seconds", "gold (eval)"),
            plot(out, "gold_vs_samples", {m: ([r.get("samples", 0) for r in eval_rows(rows)], [r["eval_gold"] for r in eval_rows(rows)])
                                          for m, (rows, _) in results.items()}, "samples", "gold (eval)")]
    return write_report(out, "compute-matched", quick, [t, t2], imgs)
