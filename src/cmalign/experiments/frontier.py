"""Every method on one gold-vs-divergence plane: how much gold does each buy for how far it moves from the base?

Methods: ROCM at several beta, RLCM, DRaFT, DPOK at several beta, D3PO at several DPO temperatures and DDPO,
each over a learning-rate grid. At every evaluation point of the fixed evaluation chains the trainer records,
for every method alike (evaluation.evaluate): gold, class accuracy, the training proxy, the held-out proxy
(another pair set and seed) and two distances to the base model that do not depend on the method's own
divergence: `kl_to_base`, the per-step KL (per_dim, final-step floor) summed over the chain between the tuned
and the base consistency model, and `distance_to_base`, the L2 distance of each sample to the base model's
sample from the same noise. DDPO tunes the DDPM teacher on its DDIM chain, so it has no consistency-chain
KL: it sits on the distance plane only.

Outputs: gold against KL and against distance with each method's Pareto frontier (over all its runs and
evaluation points: the most gold at no larger divergence), the best gold each method reaches within KL
budgets (0.05, 0.1, 0.2, 0.5) with the train seconds it needs to get there, and the train seconds to reach a
gold target within a KL budget ("time to gold g within divergence d", the compute-matched question with the
divergence held fixed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from cmalign.experiments.common import eval_rows, make_config, mean_std, seeded_train_runs, wall, write_report, write_table

# label -> (method settings, quick). --quick (the test) runs three: a consistency-chain KL method (rocm), a
# policy-gradient one with a divergence (dpok) and the teacher-chain one (ddpo, distance only), in seconds.
# Trimmed to fit 20 minutes on 2 cores: D3PO's temperature 100 (gold 5.88 after 60 steps, the base's) and
# DPOK at beta 1 (slower still than beta 0.1, which barely moves in compute-matched) gave way to DPOK at beta 0.01;
# EXTRA are left out of the default after the full 22-run grid (docs/RESULTS.md, 22.8 min) found every point of
# theirs dominated: rocm-beta1 by rocm-beta3, dpok-beta0.1 (KL 0.007, gold <= 6.0) by dpok-beta0.01.
# run(out, variants=list(VARIANTS)) trains them too.
VARIANTS = {
    "rocm-beta1": (dict(method="rocm", beta=1.0), False),
    "rocm-beta3": (dict(method="rocm", beta=3.0), False),
    "rocm-beta6": (dict(method="rocm", beta=6.0), True),
    "rocm-beta12": (dict(method="rocm", beta=12.0), False),
    "rlcm": (dict(method="rlcm", beta=0.0), False),
    "draft": (dict(method="draft", beta=0.0), False),
    "dpok-beta0.01": (dict(method="dpok", beta=0.01), False),
    "dpok-beta0.1": (dict(method="dpok", beta=0.1), True),
    "d3po-t1": (dict(method="d3po", beta=1.0), False),
    "d3po-t10": (dict(method="d3po", beta=10.0), False),
    "ddpo": (dict(method="ddpo", beta=0.0), True),
}
EXTRA = ("rocm-beta1", "dpok-beta0.1")
LRS = (1e-4, 1e-3)
KL_BUDGETS = (0.05, 0.1, 0.2, 0.5)
DISTANCE_BUDGETS = (0.5, 1.0, 2.0, 4.0)
GOLD_GAINS = (0.5, 1.0, 1.5, 2.0)  # targets: the base model's eval gold plus these
BUDGET_S = 120.0  # binds DDPO (20 network calls a chain) and DPOK; the others end on their 150 steps
EVAL_SIZE = 100  # fixed evaluation chains every 10 steps (the KL and distance are means over them)
METRICS = {"gold": "eval_gold", "accuracy": "eval_accuracy", "proxy": "eval_reward", "heldout_proxy": "eval_heldout_proxy",
           "kl": "eval_kl_to_base", "distance": "eval_distance_to_base"}


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def seed_mean_points(runs: list[list[dict]]) -> list[dict]:
    """The evaluation points averaged over seeds, on the steps every seed evaluated."""
    evs = [eval_rows(rows) for rows in runs]
    n = min(len(e) for e in evs)
    out = []
    for i in range(n):
        pts = [e[i] for e in evs]
        row = {"step": pts[0]["step"], "wall_time": sum(map(wall, pts)) / len(pts)}
        row.update({k: sum(_num(p.get(key)) for p in pts) / len(pts) for k, key in METRICS.items()})
        out.append(row)
    return out


def pareto(points: list[dict], x: str) -> list[dict]:
    """The points no other point beats in both x (lower) and gold (higher), by increasing x."""
    pts = sorted((p for p in points if math.isfinite(p[x]) and math.isfinite(p["gold"])), key=lambda p: (p[x], -p["gold"]))
    front, best = [], -math.inf
    for p in pts:
        if p["gold"] > best:
            front.append(p)
            best = p["gold"]
    return front


def best_within(points: list[dict], x: str, budget: float) -> tuple[dict | None, float | None]:
    """The most gold among points with x <= budget, and the fewest train seconds any of them needs to reach it."""
    inside = [p for p in points if math.isfinite(p[x]) and p[x] <= budget + 1e-12 and math.isfinite(p["gold"])]
    if not inside:
        return None, None
    top = max(p["gold"] for p in inside)
    return max(inside, key=lambda p: p["gold"]), min(p["wall_time"] for p in inside if p["gold"] >= top - 1e-9)


def time_to(points: list[dict], x: str, budget: float, target: float) -> float | None:
    """Fewest train seconds to a point with gold >= target and x <= budget (None: never)."""
    ok = [p["wall_time"] for p in points if math.isfinite(p[x]) and p[x] <= budget + 1e-12 and p["gold"] >= target - 1e-9]
    return min(ok) if ok else None


def peak(points: list[dict], x: str) -> tuple[dict, float, float]:
    """(the point of most gold, its x (inf where x is not finite there), the fewest train seconds to that gold at
    no larger x)."""
    ok = [p for p in points if math.isfinite(p["gold"])]
    best = max(ok, key=lambda p: p["gold"])
    limit = best[x] if math.isfinite(best[x]) else math.inf
    seconds = min(p["wall_time"] for p in ok if p["gold"] >= best["gold"] - 1e-9 and (limit == math.inf or p[x] <= limit + 1e-12))
    return best, limit, seconds


def speed_ratios(curves: dict, rocm: list[dict]) -> list[dict]:
    """A row per baseline run (not rocm): its best gold, where and when, and ROCM's time ratios to it (old and
    within the baseline's divergence there; seed-mean points)."""
    rows = []
    for (name, lr), pts in curves.items():
        if VARIANTS[name][0]["method"] == "rocm" or not rocm:
            continue
        x = "kl"
        best, limit, base_s = peak(pts, x)
        if not math.isfinite(limit):  # ddpo: no consistency-chain KL, the sample distance instead
            x = "distance"
            best, limit, base_s = peak(pts, x)
        old, within = time_to(rocm, x, math.inf, best["gold"]), time_to(rocm, x, best[x], best["gold"])
        ratio = lambda s: round(s / max(base_s, 1e-9), 3) if s is not None else None  # noqa: E731
        rows.append({"baseline": name, "lr": lr, "best_gold": round(best["gold"], 4), "step": best["step"], "s": round(base_s, 1),
                     "measure": x, "divergence_there": round(best[x], 4), "gold_final": round(pts[-1]["gold"], 4),
                     "rocm_s_old": round(old, 1) if old is not None else None, "ratio_old": ratio(old),
                     "rocm_s_within": round(within, 1) if within is not None else None, "ratio_within": ratio(within)})
    return rows


def _plane(out: Path, name: str, by_method: dict[str, list[dict]], x: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (method, pts) in enumerate(by_method.items()):
        pts = [p for p in pts if math.isfinite(p[x]) and math.isfinite(p["gold"])]
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.scatter([p[x] for p in pts], [p["gold"] for p in pts], s=6, alpha=0.3, color=color)
        front = pareto(pts, x)
        ax.plot([p[x] for p in front], [p["gold"] for p in front], marker="o", ms=3, lw=1.4, color=color, label=method)
    ax.set_xscale("symlog", linthresh=1e-3 if x == "kl" else 1e-2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gold (eval, seed mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cells(out: Path, quick: bool, threads: int, steps: int, lrs, variants, budget_s: float) -> dict:
    """(variant, lr) -> (config, run directory) of every run of the grid."""
    if variants:
        names = list(variants)
    elif quick:
        names = [n for n, (_, in_quick) in VARIANTS.items() if in_quick]
    else:
        names = [n for n in VARIANTS if n not in EXTRA]
    every = {"eval_every": 2} if quick else {"eval_size": EVAL_SIZE}  # quick: the base and the last point only
    return {(name, lr): (make_config(quick, threads, lr=lr, steps=steps, max_train_seconds=budget_s, **every, **VARIANTS[name][0]),
                         out / "runs" / f"{name}-lr{lr:g}") for name in names for lr in lrs}


def _summary_rows(curves: dict, seeded: dict, seeds: int) -> list[dict]:
    summary = []
    for (name, lr), pts in curves.items():
        finals = [eval_rows(rows)[-1] for rows in seeded[(name, lr)]]
        gold_final, gold_final_sd = mean_std([_num(f.get("eval_gold")) for f in finals])
        last = pts[-1]
        summary.append({"variant": name, "lr": lr, "seeds": seeds, "steps_done": min(rows[-1]["step"] for rows in seeded[(name, lr)]),
                        "train_s": round(last["wall_time"], 1), "gold_start": round(pts[0]["gold"], 4),
                        "gold_peak": round(max(p["gold"] for p in pts), 4), "gold_final": gold_final, "gold_final_sd": gold_final_sd,
                        "accuracy_final": round(last["accuracy"], 4), "proxy_final": round(last["proxy"], 4),
                        "heldout_proxy_final": round(last["heldout_proxy"], 4), "kl_final": round(last["kl"], 5),
                        "distance_final": round(last["distance"], 4)})
    return summary


def _budget_rows(methods: dict) -> tuple[list[dict], list[dict]]:
    """Best gold within each KL budget and each sample-distance budget, per method."""
    budgets, dist_budgets = [], []
    for method, pts in methods.items():
        row, drow = {"method": method}, {"method": method}
        for d in KL_BUDGETS:
            p, s = best_within(pts, "kl", d)
            row[f"gold_kl<={d:g}"] = round(p["gold"], 4) if p else None
            row[f"s_kl<={d:g}"] = round(s, 1) if p else None
            row[f"at_kl<={d:g}"] = f"{p['variant']} lr={p['lr']:g} step {p['step']}" if p else None
        for d in DISTANCE_BUDGETS:
            p, s = best_within(pts, "distance", d)
            drow[f"gold_dist<={d:g}"] = round(p["gold"], 4) if p else None
            drow[f"s_dist<={d:g}"] = round(s, 1) if p else None
        budgets.append(row)
        dist_budgets.append(drow)
    return budgets, dist_budgets


def _time_to_gold_rows(methods: dict, targets: list[float]) -> list[dict]:
    ttg = []
    for method, pts in methods.items():
        row = {"method": method}
        for g, target in zip(GOLD_GAINS, targets):
            for d in KL_BUDGETS:
                s = time_to(pts, "kl", d, target)
                row[f"+{g:g}@kl<={d:g}"] = round(s, 1) if s is not None else None
        ttg.append(row)
    return ttg


def _write_tables(out: Path, curves: dict, seeded: dict, methods: dict, seeds: int, steps: int, budget_s: float, lrs) -> list:
    # step 0 of the consistency-chain runs: the base consistency model (ddpo's step 0 is its teacher's)
    starts = [c[0]["gold"] for (name, _), c in curves.items() if VARIANTS[name][0]["method"] != "ddpo"] or \
        [c[0]["gold"] for c in curves.values()]
    base_gold = sum(starts) / len(starts)
    t_sum, _ = write_table(out, "summary", _summary_rows(curves, seeded, seeds),
                           f"Every run ({steps} steps or {budget_s:g} train s, lr grid {', '.join(f'{x:g}' for x in lrs)})",
                           ["kl_final: per-step KL (per_dim, floor) of tuned to base consistency model on the fixed evaluation chains "
                            "(– for ddpo: its DDIM chain is the teacher's); distance_final: mean L2 distance ([-1, 1] pixels) to the "
                            "base model's sample from the same noise",
                            "proxy: the training proxy; heldout_proxy: another proxy (other pairs, other seed) that is never trained on: "
                            "hacking shows as proxy up with heldout_proxy and gold down"])
    budgets, dist_budgets = _budget_rows(methods)
    t_b, _ = write_table(out, "budgets", budgets, "Best gold within a KL budget (to the base consistency model), and the train seconds to it",
                         ["gold_kl<=d: the most eval gold (seed mean) at any evaluation point of any run of the method with KL <= d; "
                          "s_kl<=d: the fewest train seconds (evaluation excluded) at which a run is there; at_kl<=d: which run and step",
                          "– : no point within the budget (ddpo: no consistency-chain KL, see the distance table)",
                          f"base gold (step 0 of the consistency-chain runs): {base_gold:.4f}"])
    t_d, _ = write_table(out, "distance_budgets", dist_budgets, "Best gold within a sample-distance budget (every method, ddpo included)",
                         ["distance: mean L2 distance in [-1, 1] pixel space between a tuned sample and the base model's sample from the "
                          "same noise (for ddpo: its base teacher's); for scale, two different samples of one prompt are ~4 apart"])
    targets = [round(base_gold + g, 4) for g in GOLD_GAINS]
    t_t, _ = write_table(out, "time_to_gold", _time_to_gold_rows(methods, targets), "Train seconds to gold base + g within KL budget d",
                         [f"targets: base gold {base_gold:.4f} + {', '.join(f'{g:g}' for g in GOLD_GAINS)} = {', '.join(map(str, targets))}",
                          "– : no run of the method got there within the budget"])
    t_r, _ = write_table(out, "ratios", speed_ratios(curves, methods.get("rocm", [])),
                         "ROCM's train seconds to each baseline run's best gold, over the baseline's, without and within its divergence",
                         ["old: ROCM's fewest seconds (any beta, any lr) to the baseline run's best eval gold / the baseline's seconds to "
                          "it (compute-matched's definition); within: the same with ROCM held to the baseline's own divergence there "
                          "(KL to base; distance for ddpo, which has no consistency-chain KL); – : ROCM never got there",
                          "a baseline that climbs fast and then collapses is judged at its peak in both; 'within' also asks that ROCM "
                          "not move further from the base model than the baseline had"])
    trace = [{"variant": p["variant"], "lr": p["lr"], **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in p.items()
                                                         if k not in ("variant", "lr")}} for pts in methods.values() for p in pts]
    write_table(out, "points", trace, "Every evaluation point (seed mean)")
    return [t_b, t_t, t_r, t_d, t_sum]


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        lrs=None, variants=None, budget_s: float | None = None) -> Path:
    steps = steps or (2 if quick else 150)
    lrs = lrs or ((1e-3,) if quick else LRS)
    budget_s = budget_s or (60.0 if quick else BUDGET_S)
    seeded = seeded_train_runs(_cells(out, quick, threads, steps, lrs, variants, budget_s), seeds, jobs)
    curves = {key: seed_mean_points(rows) for key, rows in seeded.items()}
    methods: dict[str, list[dict]] = {}
    for (name, lr), pts in curves.items():
        methods.setdefault(VARIANTS[name][0]["method"], []).extend({**p, "variant": name, "lr": lr} for p in pts)
    tables = _write_tables(out, curves, seeded, methods, seeds, steps, budget_s, lrs)
    imgs = [_plane(out, "gold_vs_kl", methods, "kl", "per-step KL to the base consistency model (sum over steps)"),
            _plane(out, "gold_vs_distance", methods, "distance", "L2 distance to the base sample (same noise)")]
    return write_report(out, "frontier", quick, tables, imgs,
                        ["Each line is a method's Pareto frontier over all its runs (betas / temperatures, learning rates) and "
                         "evaluation points; faint dots are all the points. points.csv holds every point.", ""])
