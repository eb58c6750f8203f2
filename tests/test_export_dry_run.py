"""`cmalign train --dry-run` (one training step, seconds and peak memory, nothing written) and the cost entry
of every run's report (median seconds per logged step, peak memory), on the tiny digits world."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from cmalign.cli import main
from cmalign.training.cost import seconds_per_step
from cmalign.training.trainer import train
from cmalign.worlds.registry import world_class
from helpers import TINY_ARGS, tiny_config
from test_bad_inputs import snapshot


def test_dry_run_measures_one_step_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory would be runs/... here
    cache = Path(os.environ["CMALIGN_CACHE"])
    world_class("digits").prepare(tiny_config(), False)  # the cache a world needs (built if cold) may be written
    before, cached = snapshot(tmp_path), snapshot(cache)
    assert main(["train", "--dry-run", *TINY_ARGS, "--report-to", "tensorboard"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cmalign: dry run, nothing written"))
    seconds = float(re.search(r"took ([0-9.e+-]+) s \(warm-up included\)", line).group(1))
    mib = float(re.search(r"peak memory ([0-9.]+) MiB \(host peak RSS\)", line).group(1))
    assert seconds > 0 and mib > 10
    assert snapshot(tmp_path) == before and snapshot(cache) == cached
    assert list(tmp_path.iterdir()) == []  # no run directory, lock, tensorboard/ or runs/


def test_every_run_reports_seconds_per_step_and_peak_memory(tmp_path):
    run = train(tiny_config(steps=3, output_dir=str(tmp_path / "run")), progress=False)
    final = json.loads((run / "final_eval.json").read_text())
    cost = final["cost"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    walls = [0.0] + [r["wall_time"] for r in rows if "wall_time" in r]
    assert cost["steps_timed"] == 3
    assert abs(cost["seconds_per_step"] - statistics.median(b - a for a, b in zip(walls, walls[1:]))) < 1e-3
    assert cost["peak_memory_bytes"] > 10 * 2**20 and cost["peak_memory_of"] == "host peak RSS"
    report = (run / "report.md").read_text()
    assert re.search(r"Cost: [0-9.e+-]+ s per step \(median of 3 steps\), peak memory [0-9.]+ MiB \(host peak RSS\)", report)


def test_seconds_per_step_is_the_median_of_consecutive_steps():
    rows = [{"step": 0, "eval_reward": 1.0}, {"step": 1, "wall_time": 1.0}, {"step": 2, "wall_time": 1.5},
            {"step": 3, "wall_time": 4.5}, {"step": 5, "wall_time": 5.0}]  # a gap (4 not logged) is not a step
    assert seconds_per_step(rows) == (1.0, 3)
    assert seconds_per_step([{"step": 0}]) == (None, 0)
