"""Seconds per ROCM step on the digits world: the subsampled regulariser (divergence_steps N) against the full
one (all) and against the bare reward back-propagation (beta = 0, no reference calls), at K = 2, 4, 8.

Every variant runs in the same process on the same world, interleaved: each round times `--steps` updates of
every (K, variant) in a rotated order, so that drift of a shared machine hits all variants alike. The ratio
to bare is taken round by round (paired) and its median is reported beside the median seconds per step.

    .venv/bin/python benchmarks/digits_divergence_steps.py [--rounds 5] [--steps 3] [--batch-size 32] [--threads 1]
        [--csv benchmarks/digits_divergence_steps_results.csv]

--csv appends one row per (K, variant) of this run (date, threads, seconds, paired ratios) to that file, the data
behind the cost table of docs/RESULTS.md (scripts/results_tables.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from cmalign.config import TrainConfig, with_changes
from cmalign.methods.base import Batch
from cmalign.methods.rocm import Rocm
from digits_rocm_setup import digit_prompts, digits_rocm


def variants(k: int) -> dict[str, dict]:
    """The regulariser variants timed at chain length k (beta 6, the default's; bare: beta 0, no reference call)."""
    out = {"bare (beta=0)": dict(beta=0.0), "all": dict(beta=6.0, divergence_steps="all"),
           "N=1 uniform": dict(beta=6.0, divergence_steps=1, divergence_sampling="uniform"),
           "default (N=1 importance)": dict(beta=6.0)}
    if k > 2:
        out["N=2 importance"] = dict(beta=6.0, divergence_steps=2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed updates per variant and round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--divergence-grad", default="full", choices=["full", "stopgrad_ref"])
    ap.add_argument("--csv", default=None, help="append this run's rows to this CSV file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = TrainConfig(batch_size=args.batch_size, threads=args.threads, divergence_grad=args.divergence_grad)
    world, reward, params, optimizer_step = digits_rocm(base)
    initial = [p.detach().clone() for p in params]

    methods = {(k, name): Rocm(with_changes(base, num_steps=k, **v), world, reward) for k in args.ks for name, v in variants(k).items()}
    gen = torch.Generator().manual_seed(0)
    prompts = digit_prompts(args.batch_size)
    times: dict = {key: [] for key in methods}
    keys = list(methods)
    for key in keys:  # warm-up: one untimed step each
        methods[key].step(Batch(prompts, gen), optimizer_step)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            with torch.no_grad():  # every variant starts from the same adapter (the step's cost does not depend on it much)
                for p, p0 in zip(params, initial):
                    p.copy_(p0)
            start = time.perf_counter()
            for _ in range(args.steps):
                methods[key].step(Batch(prompts, gen), optimizer_step)
            times[key].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {platform.processor() or ''}, "
          f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, divergence_grad {args.divergence_grad}, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| K | variant | s/step (median) | ratio to bare (median of paired rounds) | ratio to all |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for k in args.ks:
        bare, full = times[(k, "bare (beta=0)")], times[(k, "all")]
        for name in variants(k):
            t = times[(k, name)]
            to_bare = statistics.median(a / b for a, b in zip(t, bare))
            to_all = statistics.median(a / b for a, b in zip(t, full))
            print(f"| {k} | {name} | {statistics.median(t):.3f} | {to_bare:.3f} | {to_all:.3f} |")
            rows.append({"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "threads": args.threads, "K": k, "variant": name,
                         "rounds": args.rounds, "steps": args.steps, "s_per_step": round(statistics.median(t), 4),
                         "ratio_to_bare": round(to_bare, 3), "ratio_to_all": round(to_all, 3)})
    if args.csv:
        append_csv(args.csv, rows)


def append_csv(path: str, rows: list[dict]) -> None:
    import csv
    import os

    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
