"""The short report of a run: curves against step (PNG) and a markdown summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cmalign.training.run_dir import writing  # noqa: E402

# The pictures report.md may link, in the order shown; a run writes only some of them (gold.png
# needs a gold score: digits runs only; before_after.png needs a final evaluation).
PICTURES = (("before/after", "before_after.png"), ("reward", "reward.png"), ("gold", "gold.png"), ("divergence", "divergence.png"),
            ("held-out rewards", "heldout.png"))


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
        "heldout": [(key, key.removeprefix("eval_heldout_") + " (never trained on)")
                    for key in dict.fromkeys(k for r in rows for k in r if k.startswith("eval_heldout_"))],
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
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.15, top=0.96)  # fixed margins: tight_layout is 40% of a tiny run's plotting
        path = Path(run_dir) / f"{name}.png"
        try:
            with writing("the plot", path):
                fig.savefig(path, dpi=120)
        finally:
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
    shown = [f"![{label}]({name})" for label, name in PICTURES if (Path(run_dir) / name).is_file()]  # no dead links
    if shown and shown[0].endswith("(before_after.png)"):
        lines += ["", shown.pop(0)]
    if shown:
        lines += ["", " ".join(shown)]
    lines.append("")
    path = Path(run_dir) / "report.md"
    tmp = path.with_name(".report.md.tmp")
    with writing("the report", path):
        try:
            tmp.write_text("\n".join(lines))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def save_report_samples(run_dir: Path, distinct: list[str], prompts: list[str], base, tuned, num_steps: int) -> list:
    """report_images/NN_base.png and NN_tuned.png: the first sample of each prompt (same noise); returns the
    side-by-side entries of report.html: (prompt, [(caption, relative path), ...])."""
    from cmalign.training.evaluation import image_grid

    folder = Path(run_dir) / "report_images"
    folder.mkdir(exist_ok=True)
    entries = []
    for n, p in enumerate(distinct):
        i = prompts.index(p)
        cells = []
        for label, images in (("base", base), ("tuned", tuned)):
            name = f"report_images/{n:02d}_{label}.png"
            image_grid(images[i : i + 1], 1).save(Path(run_dir) / name)
            cells.append((f"{label}, K={num_steps}", name))
        entries.append((p, cells))
    return entries


def write_html_report(run_dir: Path, summary: str, final: dict, samples: list) -> Path:
    """RUN/report.html (training/report_html.py): curves, the final table, labelled samples, the config."""
    from cmalign.training.report_html import run_report

    run_dir = Path(run_dir)
    curves = [name for _, name in PICTURES if name != "before_after.png" and (run_dir / name).is_file()]
    if (run_dir / "before_after.png").is_file():
        curves.append("before_after.png")
    config = (run_dir / "config.yaml").read_text(errors="replace") if (run_dir / "config.yaml").is_file() else ""
    return run_report(run_dir, final, curves, samples, config, summary)
