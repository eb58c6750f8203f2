"""The short report of a run: curves against step (PNG) and a markdown summary."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dir: Path) -> list[Path]:
    """reward.png, gold.png (where a gold exists) and divergence.png against step."""
    rows = read_metrics(run_dir)
    panels = {
        "reward": [("reward", "train batch"), ("eval_reward", "fixed eval set")],
        "gold": [("gold", "train batch"), ("eval_gold", "fixed eval set")],
        "divergence": [("divergence", "train batch (sum over steps)"), ("eval_divergence", "fixed eval set")],
    }
    written = []
    for name, keys in panels.items():
        series = [(label, *_series(rows, key)) for key, label in keys]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for label, xs, ys in series:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 40 else None, ms=3, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(run_dir) / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(run_dir: Path, cfg_summary: str, final: dict) -> Path:
    """report.md: the numbers of the final evaluation (base vs tuned) and links to the pictures."""
    lines = [f"# Run report: {Path(run_dir).name}", "", cfg_summary, "",
             f"Final evaluation on {final.get('n', '?')} fresh samples (held-out seeds), mean ± std:", "",
             "| metric | base | tuned |", "| --- | --- | --- |"]
    for key in final["tuned"]:
        b, t = final["base"].get(key), final["tuned"][key]
        fmt = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}" if isinstance(s, dict) else f"{s:.3f}"  # noqa: E731
        lines.append(f"| {key} | {fmt(b) if b is not None else '–'} | {fmt(t)} |")
    lines += ["", "![before/after](before_after.png)", "", "![reward](reward.png) ![gold](gold.png) ![divergence](divergence.png)", ""]
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path
