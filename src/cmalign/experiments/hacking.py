"""Reward hacking: ROCM at beta = 0 against beta = 3 (KL), proxy and gold on the fixed evaluation
set over training. Expected (lab prototype): at beta = 0 gold peaks then collapses while the proxy
keeps rising; at beta = 3 gold holds."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import eval_rows, make_config, plot, summary, train_runs, write_report, write_table

BETAS = (0.0, 3.0)


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, jobs: int = 1) -> Path:
    steps = steps or (2 if quick else 400)
    runs = train_runs({beta: (make_config(quick, threads, method="rocm", beta=beta, steps=steps), out / "runs" / f"beta{beta:g}")
                       for beta in BETAS}, jobs)
    curves, summaries = {}, []
    for beta, rows in runs.items():
        curves[beta] = eval_rows(rows)
        s = summary(rows)
        s = {"beta": beta, **s, "gold_drop_from_peak": round(1 - s["gold_final"] / s["gold_peak"], 4) if s["gold_peak"] else ""}
        summaries.append(s)
    trace = []
    for beta, ev in curves.items():
        for r in ev:
            trace.append({"beta": beta, "step": r["step"], "wall_time": r.get("wall_time", 0.0),
                          "proxy": round(r["eval_reward"], 4), "gold": round(r["eval_gold"], 4),
                          "accuracy": round(r.get("eval_accuracy", float("nan")), 4)})
    t1, _ = write_table(out, "summary", summaries, "Summary (fixed evaluation set)",
                        ["gold/proxy/accuracy: means over the fixed evaluation chains; train_s excludes evaluation"])
    t2, _ = write_table(out, "trace", trace, "Proxy and gold over training")
    imgs = [plot(out, "gold", {f"beta={b:g}": ([r["step"] for r in ev], [r["eval_gold"] for r in ev]) for b, ev in curves.items()}, "step", "gold (eval)"),
            plot(out, "proxy", {f"beta={b:g}": ([r["step"] for r in ev], [r["eval_reward"] for r in ev]) for b, ev in curves.items()}, "step", "proxy (eval)")]
    return write_report(out, "hacking", quick, [t1, t2], imgs)
