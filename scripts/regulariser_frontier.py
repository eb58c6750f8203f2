#!/usr/bin/env python3
"""The default run with the cheap regulariser against the full one (issue 24): `cmalign train` on the digits world
at several betas and seeds for each regulariser variant, scored on the test evaluation (final_eval.json: 500
chains on held-out noise), written as results/divergence-steps/summary.csv (a row per run), intervals.csv (95% intervals of every mean and
gap) and cells.csv (a row per variant and beta: the means with their intervals, for the docs' tables).

    python scripts/regulariser_frontier.py --runs runs/divergence-steps [--betas 3 6 12] [--seeds 0 1 2]
        [--variants importance all] [--jobs 2] [--out results/divergence-steps] [--collect-only]

Variants: importance = the default (`cmalign train`: one reference step per update, drawn in proportion to the
measured per-step divergence), all = `--divergence-steps all`, uniform = `--divergence-steps 1
--divergence-sampling uniform`. A run whose folder already holds final_eval.json is reused, not retrained.
Every run uses 1 torch thread; `--jobs` runs train side by side (pairs of variants at the same beta and seed run
together, so that their times share the machine's load).

Intervals (intervals.csv): 95% percentile bootstrap, 4,000 resamples, fixed RNG: seeds are resampled with
replacement and each resampled seed's test mean is drawn from N(mean, sem^2) of its 500 test chains
(a parametric stand-in for resampling the chains). Gaps between variants pair runs of the same beta and seed
(the same training noise and test chains). No time ratio is taken from these runs: they share the machine with
other work, so their seconds are not comparable; the cost is measured by benchmarks/digits_divergence_steps.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FLAGS = {"importance": [], "all": ["--divergence-steps", "all"],
         "uniform": ["--divergence-steps", "1", "--divergence-sampling", "uniform"]}
METRICS = ("gold", "accuracy", "kl_to_base", "distance_to_base", "heldout_proxy", "reward")
RESAMPLES = 4000
RANGES = {"accuracy": (0.0, 1.0), "kl_to_base": (0.0, float("inf")), "distance_to_base": (0.0, float("inf"))}


def drawn_mean(rng: random.Random, run: dict, metric: str) -> float:
    """One parametric draw of a run's test mean, kept inside the metric's range (accuracy <= 1, KL >= 0)."""
    lo, hi = RANGES.get(metric, (-float("inf"), float("inf")))
    return min(hi, max(lo, rng.gauss(run[f"test_{metric}"], run[f"test_{metric}_sem"])))


def run_dir(runs: Path, variant: str, beta: float, seed: int) -> Path:
    return runs / f"{variant}-beta{beta:g}-seed{seed}"


def train(runs: Path, variant: str, beta: float, seed: int) -> None:
    out = run_dir(runs, variant, beta, seed)
    if (out / "final_eval.json").is_file():
        return
    cmd = [sys.executable, "-m", "cmalign", "train", *FLAGS[variant], "--beta", f"{beta:g}", "--seed", str(seed),
           "--threads", "1", "--output-dir", str(out), "--overwrite"]
    with open(str(out) + ".log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"finished {out}", flush=True)


def row_of(runs: Path, variant: str, beta: float, seed: int) -> dict:
    folder = run_dir(runs, variant, beta, seed)
    final = json.loads((folder / "final_eval.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    updates = [r for r in rows if r.get("grad_norm") is not None]
    row = {"variant": variant, "divergence_steps": "all" if variant == "all" else 1,
           "divergence_sampling": {"all": "", "uniform": "uniform", "importance": "importance"}[variant],
           "beta": beta, "seed": seed, "n_test": final["tuned"]["gold"]["n"]}
    for m in METRICS:
        row[f"test_{m}"] = round(final["tuned"][m]["mean"], 4)
        row[f"test_{m}_sem"] = round(final["tuned"][m]["sem"], 5)
    row["base_test_gold"] = round(final["base"]["gold"]["mean"], 4)
    row["clipped_share"] = round(sum(r["grad_norm"] > 1.0 for r in updates) / len(updates), 3)  # grad_clip 1.0
    row["train_s"] = round(max(r.get("wall_time", 0.0) for r in rows), 1)
    row["s_per_step"] = final["cost"]["seconds_per_step"]
    return row


def bootstrap(draw, rng: random.Random) -> tuple[float, float]:
    values = sorted(draw(rng) for _ in range(RESAMPLES))
    return values[int(0.025 * RESAMPLES)], values[int(0.975 * RESAMPLES) - 1]


def mean_interval(runs: list[dict], metric: str, rng: random.Random) -> dict:
    def draw(r):
        picked = [r.choice(runs) for _ in runs]
        return statistics.fmean(drawn_mean(r, x, metric) for x in picked)

    lo, hi = bootstrap(draw, rng)
    return {"estimate": round(statistics.fmean(x[f"test_{metric}"] for x in runs), 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def gap_interval(pairs: list[tuple[dict, dict]], metric: str, rng: random.Random) -> dict:
    def draw(r):
        picked = [r.choice(pairs) for _ in pairs]
        return statistics.fmean(drawn_mean(r, a, metric) - drawn_mean(r, b, metric) for a, b in picked)

    lo, hi = bootstrap(draw, rng)
    est = statistics.fmean(a[f"test_{metric}"] - b[f"test_{metric}"] for a, b in pairs)
    return {"estimate": round(est, 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def intervals(rows: list[dict]) -> list[dict]:
    rng = random.Random(0)
    out = []
    cells = sorted({(r["variant"], r["beta"]) for r in rows}, key=lambda c: (c[1], c[0]))
    for variant, beta in cells:
        runs = [r for r in rows if (r["variant"], r["beta"]) == (variant, beta)]
        for metric in ("gold", "accuracy", "kl_to_base", "distance_to_base"):
            out.append({"quantity": f"test_{metric}", "variant": variant, "versus": "", "beta": beta, "seeds": len(runs),
                        **mean_interval(runs, metric, rng)})
        if variant == "all":
            continue
        full = {r["seed"]: r for r in rows if (r["variant"], r["beta"]) == ("all", beta)}
        pairs = [(r, full[r["seed"]]) for r in runs if r["seed"] in full]
        if not pairs:
            continue
        for metric in ("gold", "kl_to_base"):
            out.append({"quantity": f"gap_test_{metric}", "variant": variant, "versus": "all", "beta": beta,
                        "seeds": len(pairs), **gap_interval(pairs, metric, rng)})
    return out


def cells_table(rows: list[dict], spans: list[dict]) -> list[dict]:
    """One row per (variant, beta): seed means with their 95% intervals side by side (for the docs' tables)."""
    out = []
    for variant, beta in sorted({(r["variant"], r["beta"]) for r in rows}, key=lambda c: (c[1], c[0] != "importance", c[0])):
        runs = [r for r in rows if (r["variant"], r["beta"]) == (variant, beta)]
        row = {"variant": variant, "beta": beta, "seeds": len(runs)}
        for metric in ("gold", "accuracy", "kl_to_base", "distance_to_base"):
            span = next(i for i in spans if (i["quantity"], i["variant"], i["beta"]) == (f"test_{metric}", variant, beta))
            row.update({metric: span["estimate"], f"{metric}_lo": span["lo"], f"{metric}_hi": span["hi"]})
        row["clipped_share"] = round(statistics.fmean(r["clipped_share"] for r in runs), 3)
        row["train_s"] = round(statistics.fmean(r["train_s"] for r in runs), 1)
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/divergence-steps"))
    ap.add_argument("--out", type=Path, default=Path("results/divergence-steps"))
    ap.add_argument("--betas", type=float, nargs="+", default=[3.0, 6.0, 12.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["importance", "all"], choices=list(FLAGS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true", help="write the tables from the finished runs, train nothing")
    args = ap.parse_args()
    cells = [(v, b, s) for b in args.betas for s in args.seeds for v in args.variants]
    if not args.collect_only:
        args.runs.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: train(args.runs, *c), cells))
    rows = [row_of(args.runs, *c) for c in cells if (run_dir(args.runs, *c) / "final_eval.json").is_file()]
    write_csv(args.out / "summary.csv", rows)
    spans = intervals(rows)
    write_csv(args.out / "intervals.csv", spans)
    write_csv(args.out / "cells.csv", cells_table(rows, spans))
    print(f"{len(rows)} of {len(cells)} runs -> {args.out}/summary.csv, intervals.csv")


if __name__ == "__main__":
    main()
