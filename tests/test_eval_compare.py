"""Evaluation the way the field publishes (issue 21): held-out rewards during training, `cmalign eval` of a base
model and a run on a PartiPrompts file (bootstrap intervals, paired deltas, win rates), report.html rendered in
headless Chromium, TensorBoard images, and samples.npz seeds that regenerate one image in stock diffusers."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cmalign.cli import main
from cmalign.training.compare import Comparison, bootstrap_ci, summary_rows
from lcm_fixtures import RESOLUTION, save_tiny_pipeline, tiny_clip

ROOT = Path(__file__).resolve().parents[1]
PARTI = "Prompt\tCategory\tChallenge\tNote\na red cat\tAnimals\tBasic\t\na dog on grass\tAnimals\tBasic\t\n" \
        "a \"blue\" café\tFood & Beverage\tSimple Detail\tunicode\n"


def test_summary_rows_bootstrap_pairs_and_win_rates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 3))
    tuned = base + 0.5 + 0.1 * rng.normal(size=(5, 3))
    rows = summary_rows(Comparison(["p"] * 5, 3, list(range(15)), {"base": {"r": {2: base}}, "run": {"r": {2: tuned}}}))
    b, t = rows
    assert (b["model"], b["n"], b["delta_vs_base"], b["delta_ci95"], b["win_rate_vs_base"]) == ("base", 15, None, None, None)
    assert b["ci95"][0] <= b["mean"] <= b["ci95"][1] and t["ci95"][0] <= t["mean"] <= t["ci95"][1]
    assert t["delta_vs_base"] == pytest.approx((tuned - base).mean())
    assert t["delta_ci95"][0] <= t["delta_vs_base"] <= t["delta_ci95"][1] and t["delta_ci95"][0] > 0
    assert t["win_rate_vs_base"] == float((tuned > base).mean())
    assert bootstrap_ci(np.array([2.0])) == [2.0, 2.0]  # one prompt: a point, holding its mean


def chromium_check(page: Path) -> dict:
    """Render page in headless Chromium; the report's inline script writes what loaded into #cmalign-check."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CMALIGN_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (scripts/test.sh installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<div id="cmalign-check" data-images="(\d+)" data-broken="(\d+)" data-errors="(\d+)"', proc.stdout)
    assert found, (proc.returncode, proc.stdout[-500:], proc.stderr[-1500:])
    return dict(zip(("images", "broken", "errors"), map(int, found.groups())))


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalx")
    model, (clip, _) = save_tiny_pipeline(root / "model"), tiny_clip(root / "clip")
    run = root / "run"
    assert main(["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", str(RESOLUTION),
                 "--lcm.guidance-scale", "8", "--prompts", "a red cat", "a dog", "--eval-prompts", "a bird", "a cow",
                 "--reward-weights", "clip_score=1.0", "--reward-paths", f"clip_score={clip}",
                 "--eval-reward-weights", "jpeg_incompressibility=1.0", "--lora-rank", "4", "--lora-alpha", "4",
                 "--num-steps", "2", "--steps", "2", "--batch-size", "1", "--lr", "0.05", "--eval-every", "1",
                 "--grid-every", "1", "--eval-size", "2", "--final-eval-size", "2", "--checkpoint-every", "0",
                 "--device", "cpu", "--threads", "1", "--mixed-precision", "no", "--output-dir", str(run)]) == 0
    return root, model, clip, run


def test_training_logs_heldout_rewards_images_and_an_html_report(lcm_run):
    _, _, _, run = lcm_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward" in r]
    assert len(evals) == 3 and all(isinstance(r.get("eval_heldout_jpeg_incompressibility"), float) for r in evals)
    final = json.loads((run / "final_eval.json").read_text())
    assert {"heldout_jpeg_incompressibility", "reward"} <= set(final["base"]) & set(final["tuned"])
    assert (run / "heldout.png").is_file() and (run / "before_after.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "cmalign"), size_guidance={"images": 0}).Reload()
    assert "samples" in events.Tags()["images"] and len(events.Images("samples")) == 3  # steps 0, 1, 2
    assert "eval_heldout_jpeg_incompressibility" in events.Tags()["scalars"]

    text = (run / "report.html").read_text()
    assert "heldout_jpeg_incompressibility" in text and "a bird" in text and "tuned, K=2" in text and "<pre>" in text
    assert "http://" not in text and "https://" not in text
    assert chromium_check(run / "report.html") == {"images": len(re.findall("<img ", text)), "broken": 0, "errors": 0}


def test_eval_compares_base_and_run_on_parti_prompts(lcm_run, capsys):
    root, model, clip, run = lcm_run
    (root / "PartiPrompts.tsv").write_text(PARTI, encoding="utf-8")
    out = root / "out"
    assert main(["eval", "--lcm-model", str(model), "--run", str(run), "--prompt-file", f"parti:{root / 'PartiPrompts.tsv'}",
                 "--prompt-category", "Animals", "Food & Beverage", "--reward-weights", "clip_score=1.0",
                 "jpeg_incompressibility=1.0", "--reward-paths", f"clip_score={clip}", "--num-steps", "1", "2",
                 "--num-per-prompt", "2", "--seed", "0", "--resolution", str(RESOLUTION), "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["model"], r["reward"], r["num_steps"]) for r in rows] == [
        (m, r, k) for m in ("base", "run") for r in ("clip_score", "jpeg_incompressibility") for k in (1, 2)]
    for r in rows:
        assert r["n"] == 3 * 2 and r["ci95"][0] <= r["mean"] <= r["ci95"][1]
        paired = r["model"] == "run"
        assert (r["delta_vs_base"] is not None) == paired and (r["win_rate_vs_base"] is not None) == paired
        if paired:
            assert r["delta_ci95"][0] <= r["delta_vs_base"] <= r["delta_ci95"][1] and 0 <= r["win_rate_vs_base"] <= 1
    with open(out / "per_prompt.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["model", "prompt", "seed", "K", "clip_score", "jpeg_incompressibility"]
    assert len(table) == 2 * 2 * 6 and {t["prompt"] for t in table} == {"a red cat", "a dog on grass", 'a "blue" café'}
    assert [t["seed"] for t in table[:6]] == [str(s) for s in range(6)]
    assert len(list((out / "images").rglob("*.png"))) == 24
    # the same noise for every model: the base's clip scores at K=1 equal whatever the run adds only through its adapter
    assert chromium_check(out / "report.html") == {"images": 3 * 4, "broken": 0, "errors": 0}
    assert "run" in capsys.readouterr().out
    code = main(["eval", "--lcm-model", str(model), "--run", str(run), "--prompt-file", str(root / "PartiPrompts.tsv"),
                 "--reward-weights", "clip_score=1.0", "--num-steps", "1", "--out", str(out)])
    assert code == 2 and "already holds an evaluation" in capsys.readouterr().err


def docs_snippet() -> str:
    text = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    return re.search(r"<!-- regenerate-one-image -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_samples_npz_seed_regenerates_one_image_in_stock_diffusers(lcm_run, tmp_path):
    _, model, _, run = lcm_run
    samples = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--prompts", "a red cat", "a dog", "--num-per-prompt", "2", "--seed", "7",
                 "--out", str(samples)]) == 0
    data = np.load(samples / "samples.npz")
    assert list(data["seeds"]) == [7, 8, 9, 10] and list(data["prompts"]) == ["a red cat"] * 2 + ["a dog"] * 2
    assert int(data["num_steps"]) == 2 and float(data["guidance_scale"]) == 8.0
    scope = {"MODEL": str(model), "RUN": str(run), "SAMPLES": str(samples / "samples.npz"), "I": 3}
    exec(docs_snippet(), scope)  # noqa: S102  (the documented snippet, as a user runs it)
    ours = np.round(data["images"][3].transpose(1, 2, 0) * 255)
    assert np.abs(np.asarray(scope["image"], dtype=np.float64) - ours).max() <= 1
    other = np.round(data["images"][2].transpose(1, 2, 0) * 255)
    assert np.abs(np.asarray(scope["image"], dtype=np.float64) - other).max() > 1  # another seed, another image
    torch.set_num_threads(torch.get_num_threads())
