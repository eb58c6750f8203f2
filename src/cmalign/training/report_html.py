"""report.html of a run (RUN/report.html) and of `cmalign eval --out DIR` (DIR/report.html): curves, the
base/tuned table with 95% intervals, labelled side-by-side images per prompt, the config.

Self-contained in its folder: images are relative links to PNGs beside it, the style is inline, nothing is
fetched from the network. A small inline script counts the images that loaded and the script errors and
writes them into `<div id="cmalign-check">` (read by the tests through `chromium --headless --dump-dom`).
"""

from __future__ import annotations

import html
from pathlib import Path

from cmalign.training.run_dir import writing

MAX_PROMPTS_SHOWN = 24

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: 13px; }
th { background: #f2f2f2; }
td.prompt { text-align: left; max-width: 22em; }
figure { display: inline-block; margin: 2px 6px; text-align: center; font-size: 12px; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
img.curve { width: 380px; margin: 4px; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""

CHECK_SCRIPT = """
window.cmalignErrors = 0;
window.addEventListener("error", function (e) { if (!(e.target instanceof HTMLImageElement)) window.cmalignErrors++; });
window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) { if (!images[i].complete || images[i].naturalWidth === 0) broken++; }
  var marker = document.createElement("div");
  marker.id = "cmalign-check";
  marker.setAttribute("data-images", images.length);
  marker.setAttribute("data-broken", broken);
  marker.setAttribute("data-errors", window.cmalignErrors);
  marker.textContent = "images " + images.length + ", broken " + broken + ", script errors " + window.cmalignErrors;
  marker.style.color = "#999";
  document.body.appendChild(marker);
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def number(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else esc(x)


def interval(ci) -> str:
    return "–" if not ci or ci[0] is None else f"[{number(ci[0])}, {number(ci[1])}]"


def figure(src: str, caption: str) -> str:
    return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def page(title: str, body: list[str]) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
                      f"<style>{STYLE}</style>", f"<script>{CHECK_SCRIPT}</script>", "</head><body>",
                      f"<h1>{esc(title)}</h1>", *body, "</body></html>", ""])


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def config_section(config_text: str) -> list[str]:
    return ["<h2>Configuration</h2>", f"<pre>{esc(config_text)}</pre>"] if config_text else []


def side_by_side(entries: list[tuple[str, list[tuple[str, str]]]]) -> list[str]:
    """entries: (prompt, [(caption such as "base, K=4", image path)]) -> a table row per prompt."""
    rows = [[td(esc(prompt), "prompt"), td("".join(figure(src, cap) for cap, src in cells))] for prompt, cells in entries]
    return ["<h2>Samples per prompt (same noise for every model)</h2>", table(["prompt", "images"], rows)]


def write_html(path: Path, text: str) -> Path:
    with writing("the HTML report", path):
        path.write_text(text, encoding="utf-8")
    return path


# --- cmalign eval --out DIR ---------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    header = ["model", "reward", "K", "n", "mean", "95% CI", "Δ vs base", "Δ 95% CI", "win rate vs base"]
    body = [[td(esc(r["model"]), "prompt"), td(esc(r["reward"]), "prompt"), td(str(r["num_steps"])), td(str(r["n"])),
             td(number(r["mean"])), td(interval(r["ci95"])), td(number(r["delta_vs_base"])), td(interval(r["delta_ci95"])),
             td("–" if r["win_rate_vs_base"] is None else f"{r['win_rate_vs_base']:.2f}")] for r in rows]
    return table(header, body)


def eval_report(out: Path, rows: list[dict], comparison, config_text: str = "", title: str = "cmalign eval") -> Path:
    """OUT/report.html of `cmalign eval`: the summary table and, per prompt, each model's first sample at each K."""
    n = comparison.num_per_prompt
    entries = []
    for p, prompt in enumerate(comparison.prompts[:MAX_PROMPTS_SHOWN]):
        cells = [(f"{model}, K={k}", paths[p * n]) for model, by_k in comparison.images.items()
                 for k, paths in by_k.items() if paths]
        entries.append((prompt, sorted(cells, key=lambda c: int(c[0].rsplit("K=", 1)[1]))))
    body = [f"<p>{len(comparison.prompts)} prompts × {n} samples per prompt, each image from its own seed (per_prompt.csv); "
            "intervals: bootstrap over prompts; deltas paired on the same prompt and noise.</p>",
            "<h2>Scores</h2>", summary_table(rows), *side_by_side(entries), *config_section(config_text)]
    return write_html(out / "report.html", page(title, body))


# --- RUN/report.html ------------------------------------------------------------------------------------
def final_table(final: dict) -> str:
    rows = []
    for key, tuned in final.get("tuned", {}).items():
        base = final.get("base", {}).get(key)
        cell = lambda s: td(f"{number(s['mean'])} {interval(s.get('ci95'))}" if isinstance(s, dict) else number(s))  # noqa: E731
        rows.append([td(esc(key), "prompt"), cell(base) if base is not None else td("–"), cell(tuned)])
    return table(["metric", "base: mean [95% CI]", "tuned: mean [95% CI]"], rows)


def run_report(run_dir: Path, final: dict, curves: list[str], samples: list[tuple[str, list[tuple[str, str]]]],
               config_text: str, summary: str = "") -> Path:
    """RUN/report.html: the curves, the final base/tuned table, labelled base | tuned samples per prompt, the config."""
    body = [f"<p>{esc(summary)}</p>"] if summary else []
    if curves:
        body += ["<h2>Curves</h2>", "".join(f'<img class="curve" src="{esc(c)}" alt="{esc(c)}">' for c in curves)]
    if final:
        body += [f"<h2>Final evaluation: base vs tuned on {esc(final.get('n', '?'))} held-out samples</h2>", final_table(final)]
    if samples:
        body += side_by_side(samples)
    body += config_section(config_text)
    return write_html(Path(run_dir) / "report.html", page(f"Run report: {Path(run_dir).name}", body))
