"""`cmalign experiment scaling-grid`: ROCM vs RLCM over intrinsic dimension, the compositional digits grid at
N = 1, 2, 3 (see experiments/scaling.py, run_grid)."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.scaling import run_grid


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1) -> Path:
    return run_grid(out, quick=quick, threads=threads, steps=steps, seeds=seeds, jobs=jobs)
