"""The paper's analyses, one file each: thin scripts over Trainer + evaluation that write a markdown
and a CSV table and PNG plots into their results directory (`cmalign experiment NAME [--quick] [--out DIR]`).
Those that compare methods follow one protocol (protocol.py: equal tuning grids, selection on validation chains,
numbers from test chains, bootstrap intervals) and write summary.csv (a row per run) and intervals.csv.
--quick runs each on the tiny digits models in seconds (the tests); without it they use the default
base model and budgets sized for a 2-core CPU (see run_experiment for how they use the cores)."""

from __future__ import annotations

EXPERIMENTS = {
    "hacking": "beta = 0 vs beta = 3: proxy and gold over training (reward hacking)",
    "compute-matched": "ROCM vs RLCM, DDPO, DRaFT, DPOK, D3PO at the same samples and tuning grid: test gold, gaps and speed ratios with 95% intervals",
    "beta-sweep": "final and peak gold per divergence over a log grid of beta",
    "divergences": "KL / JS / Hellinger / Fisher at each one's best beta (from beta-sweep), two seeds",
    "ablations": "final_step floor/skip, per_dim/joint, divergence_grad, backprop_steps",
    "generalization": "train on five digit classes, score trained and held-out classes (beta 0 / 3 / 6)",
    "scaling": "ROCM vs RLCM under the protocol at each resolution (8x8, 16x16) and K (2, 4, 8): test gold gap and time ratios with 95% intervals",
    "scaling-grid": "the same over intrinsic dimension (digits grid N = 1, 2, 3), with the time ratio also within RLCM's KL to base",
    "nondiff": "hybrid ROCM vs RLCM, DDPO on the non-differentiable rating (1-5 stars) at matched compute, judged on gold",
    "frontier": "every method's tuning grid on the test gold-vs-divergence planes (KL, sample distance, proxy drop): best gold within budgets",
    "finetune-mode": "LoRA vs full fine-tuning at matched steps (gold, divergence, accuracy, s/step, peak RSS); full on 1 vs 2 ranks",
}


MARKER = ".cmalign-experiment"  # in an experiment's results folder: which experiment wrote it


def check_out_folder(name: str, out_dir, overwrite: bool = False):
    """The results folder, checked before any work: not a file nor under one, and either new, empty or
    this experiment's own (its marker file says so); a folder holding anything else is refused unless
    overwrite. Writes the marker, so that a rerun into it is allowed."""
    from pathlib import Path

    from cmalign.errors import UserError
    from cmalign.training.run_dir import ensure_writable_dir, writing

    out_dir = Path(out_dir)
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out_dir else f"is under {parent}, which is a file"
            raise UserError(f"--out {out_dir} {where}; give a folder")
    marker = out_dir / MARKER
    owner = marker.read_text(errors="replace").strip() if marker.is_file() else None
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and owner != name and not overwrite:
        what = f"the results of experiment {owner}" if owner else f"files that are not this experiment's ({', '.join(entries[:3])}"
        what += "" if owner else (", ..." if len(entries) > 3 else "") + ")"
        raise UserError(f"--out {out_dir} holds {what}; choose another --out, or pass --overwrite to write "
                        f"{name}'s results into it (files of the same names are replaced)")
    ensure_writable_dir(out_dir, "--out folder")
    with writing("the experiment marker", marker):
        marker.write_text(name + "\n")
    return out_dir


def run_experiment(name: str, out: str | None = None, quick: bool = False, threads: int | None = None,
                   steps: int | None = None, seeds: int | None = None, jobs: int | None = None, overwrite: bool = False):
    """Run one experiment into `out` and return its README. Experiments of independent runs train them
    `jobs` at a time (default: one per core, 1 thread each; quick: in order, as worker processes would
    cost more than the runs); the others train in order with every core (default threads)."""
    import inspect
    import os
    import re
    from importlib import import_module
    from pathlib import Path

    import torch

    from cmalign.errors import UserError
    from cmalign.training.run_dir import writing

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    module = import_module(f".{name.replace('-', '_')}", __name__)
    params = inspect.signature(module.run).parameters
    cores = os.cpu_count() or 1
    kwargs = {"steps": steps} if steps else {}
    if seeds:
        if "seeds" not in params:
            raise UserError(f"experiment {name} runs one seed per setting; --seeds does not apply")
        kwargs["seeds"] = seeds
    if "jobs" in params:
        threads = threads or 1
        kwargs["jobs"] = jobs or (1 if quick else max(1, cores // threads))
    elif jobs and jobs > 1:
        raise UserError(f"experiment {name} trains its runs one after another (it keeps each trained model); --jobs does not apply")
    threads = threads or cores
    out_dir = check_out_folder(name, Path(out) if out else Path("results") / (name + ("-quick" if quick else "")), overwrite)
    torch.set_num_threads(threads)  # the runs trained in this process, and the thread count in the report
    with writing("the results of experiment " + name + " into", out_dir):  # a full disk: one line
        report = module.run(out_dir, quick=quick, threads=threads, **kwargs)
    # The report's command line with every option that shaped the run, so that it reproduces it.
    command = " ".join(["cmalign experiment", name] + (["--quick"] if quick else []) + ["--out", str(out_dir), "--threads", str(threads)]
                       + [f"--{k} {v}" for k, v in kwargs.items()])
    text = report.read_text()
    with writing("the report", report):
        report.write_text(re.sub(r"^- command: `[^`]*`", lambda _: f"- command: `{command}`", text, count=1, flags=re.M))
    return report
