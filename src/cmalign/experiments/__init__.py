"""The paper's analyses, one file each: thin scripts over Trainer + evaluation that write a markdown
and a CSV table and PNG plots into their results directory (`cmalign experiment NAME [--quick] [--out DIR]`).
--quick runs each on the tiny digits models in seconds (the tests); without it they use the default
base model and budgets sized for a 2-core CPU."""

from __future__ import annotations

EXPERIMENTS = {
    "hacking": "beta = 0 vs beta = 3: proxy and gold over training (reward hacking)",
    "compute-matched": "ROCM vs RLCM vs DDPO vs DRaFT vs DPOK at the same samples: gold vs wall-clock and samples",
    "beta-sweep": "final and peak gold per divergence over a log grid of beta",
    "divergences": "KL / JS / Hellinger / Fisher at each one's best beta (from beta-sweep), two seeds",
    "ablations": "final_step floor/skip, per_dim/joint, divergence_grad, backprop_steps",
}


def run_experiment(name: str, out: str | None = None, quick: bool = False, threads: int = 1):
    from importlib import import_module
    from pathlib import Path

    from ..errors import UserError

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    module = import_module(f".{name.replace('-', '_')}", __name__)
    out_dir = Path(out) if out else Path("results") / (name + ("-quick" if quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    return module.run(out_dir, quick=quick, threads=threads)
