"""What a run costs: seconds per training step and peak memory, for every run's report and for
`cmalign train --dry-run` (one step, nothing written).

- seconds per step: the median of the logged steps' wall times (metrics.jsonl's `wall_time` is the run's
  cumulative training seconds, evaluation excluded; a step's time is its difference to the step before);
- peak memory: on CUDA torch.cuda.max_memory_allocated (the process's tensors on the accelerator, since start
  or the last reset); on the host the peak resident set size of the process (resource.getrusage; it includes
  the Python interpreter and every library, and never goes down).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def peak_memory(device) -> dict:
    """{"peak_memory_bytes": N, "peak_memory_of": what was measured}."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_of": "cuda max_memory_allocated"}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_bytes": int(rss * scale), "peak_memory_of": "host peak RSS"}


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def seconds_per_step(rows: list[dict]) -> tuple[float | None, int]:
    """(median seconds per logged step, how many steps were timed) from metrics rows."""
    timed = sorted((int(r["step"]), float(r["wall_time"])) for r in rows if r.get("wall_time") is not None)
    durations = [t1 - t0 for (s0, t0), (s1, t1) in zip(timed, timed[1:]) if s1 == s0 + 1]
    if timed and timed[0][0] == 1:  # the first step starts at 0 train seconds
        durations.insert(0, timed[0][1])
    return (statistics.median(durations) if durations else None), len(durations)


def run_cost(rows: list[dict], device) -> dict:
    """The `cost` entry of final_eval.json."""
    per_step, n = seconds_per_step(rows)
    return {"seconds_per_step": None if per_step is None else round(per_step, 4), "steps_timed": n,
            **peak_memory(device)}


def describe(cost: dict) -> str:
    """One sentence for report.md and the console."""
    per_step = cost.get("seconds_per_step")
    timing = "no step timed" if per_step is None else (
        f"{per_step:.3g} s per step (median of {cost['steps_timed']} step{'s' * (cost['steps_timed'] != 1)})")
    return f"Cost: {timing}, peak memory {cost['peak_memory_bytes'] / 2**20:.1f} MiB ({cost['peak_memory_of']})."


def dry_run(trainer) -> dict:
    """One training step of a built trainer (Trainer(..., dry_run=True): no run directory, no lock, no
    trackers): the method's update on one drawn batch, timed as a run's logged wall_time times it (the
    world's per-step metrics, e.g. the digits gold score and its lazily fitted ensemble, excluded); and the
    peak memory. The first step includes warm-up (kernel selection, lazy initialisation), so it is an upper
    bound on a run's seconds per step."""
    device = trainer.accelerator.device
    reset_peak_memory(device)
    gen = torch.Generator().manual_seed(trainer.cfg.seed * 1000)
    batch = trainer._draw_batch(gen)
    trainer.step = 1
    start = time.perf_counter()
    metrics, _ = trainer.method.step(batch, trainer.optimizer_step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds_per_step": round(seconds, 4), "steps_timed": 1, **peak_memory(device),
            "loss": metrics.get("loss"), "skipped": trainer._step_bad}
