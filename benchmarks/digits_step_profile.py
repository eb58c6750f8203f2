"""Where a ROCM step's time goes on the digits world: torch.profiler's top operators of one process for the bare
step (beta 0), the default regulariser (one importance-drawn reference step per update) and the full one (all),
plus the time of the reference call's own Python overhead (switching the adapters off and on).

    .venv/bin/python benchmarks/digits_step_profile.py [--threads 2] [--k 4] [--steps 4] [--rows 12]

Prints markdown: per variant the seconds per step (outside the profiler) and the top operators by self CPU
time; then the network-call counts per step, which say what the regulariser adds (reference forwards and their
input backwards).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone

import torch
from torch.profiler import ProfilerActivity, profile

from cmalign.config import TrainConfig, with_changes
from cmalign.methods.base import Batch
from cmalign.methods.rocm import Rocm
from digits_rocm_setup import digit_prompts, digits_rocm

VARIANTS = {"bare (beta=0)": dict(beta=0.0), "default (N=1 importance)": dict(beta=6.0),
            "all": dict(beta=6.0, divergence_steps="all")}


def setup(threads: int, k: int):
    torch.set_num_threads(threads)
    base = TrainConfig(batch_size=32, threads=threads, num_steps=k)
    world, reward, _, optimizer_step = digits_rocm(base)
    methods = {name: Rocm(with_changes(base, **v), world, reward) for name, v in VARIANTS.items()}
    return world, methods, optimizer_step


def profiled(method, optimizer_step, steps: int, rows: int) -> tuple[float, float, str]:
    gen = torch.Generator().manual_seed(0)
    prompts = digit_prompts(32)
    for _ in range(2):  # warm-up
        method.step(Batch(prompts, gen), optimizer_step)
    start = time.perf_counter()
    for _ in range(steps):
        method.step(Batch(prompts, gen), optimizer_step)
    plain = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            method.step(Batch(prompts, gen), optimizer_step)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)
    convs = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution") / steps
    return plain, convs, table


def adapter_switch_ms(world, repeats: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        with world.reference_policy():
            pass
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    world, methods, optimizer_step = setup(args.threads, args.k)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), K = {args.k}, batch 32, {args.steps} profiled steps per variant\n")
    for name, method in methods.items():
        seconds, convs, table = profiled(method, optimizer_step, args.steps, args.rows)
        print(f"### {name}: {seconds:.3f} s/step unprofiled, {convs:.0f} convolutions per step\n\n```\n{table}```\n")
    print(f"Adapters off and on again around one reference call: {adapter_switch_ms(world):.2f} ms.")


if __name__ == "__main__":
    main()
