"""ROCM's design choices (DESIGN §2), each varied alone from the default (KL, beta = 3):
final_step floor/skip, divergence_reduction per_dim/joint, divergence_grad full/stopgrad_ref,
backprop_steps K/2/1."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import eval_rows, make_config, plot, summary, train_runs, write_report, write_table

VARIANTS = {
    "default": {},
    "final_step=skip": {"final_step": "skip"},
    "reduction=joint": {"divergence_reduction": "joint"},
    "divergence_grad=stopgrad_ref": {"divergence_grad": "stopgrad_ref"},
    "backprop_steps=2": {"backprop_steps": 2},
    "backprop_steps=1": {"backprop_steps": 1},
}


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, beta: float = 3.0, jobs: int = 1) -> Path:
    steps = steps or (2 if quick else 300)
    # quick mode: one truncation setting is enough to exercise the path
    variants = {name: over for name, over in VARIANTS.items() if not (quick and over.get("backprop_steps") == 2)}
    runs = train_runs({name: (make_config(quick, threads, method="rocm", beta=beta, steps=steps, **over), out / "runs" / name.replace("=", "-"))
                       for name, over in variants.items()}, jobs)
    table, curves = [], {}
    for name, rows in runs.items():
        table.append({"variant": name, **summary(rows)})
        ev = eval_rows(rows)
        curves[name] = ([r["step"] for r in ev], [r["eval_gold"] for r in ev])
    t, _ = write_table(out, "summary", table, f"Ablations of ROCM (KL, beta = {beta:g}, {steps} steps)",
                       ["the joint reduction sums over the d dimensions, so beta means d times more there",
                        "s_per_step: train seconds per update (evaluation excluded)"])
    img = plot(out, "gold", curves, "step", "gold (eval)")
    return write_report(out, "ablations", quick, [t], [img])
