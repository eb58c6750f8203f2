"""The committed quick data reproduce: `cmalign experiment hacking --quick` rerun here writes the summary.csv of
results/quick/hacking/ exactly, wall-clock columns aside (the tiny models are built into the test cache from
their seeds, so this also checks that they are the same models). It is also hacking's end-to-end test."""

from __future__ import annotations

import csv
from pathlib import Path

from cmalign.cli import main
from cmalign.experiments.protocol import is_timing
from helpers import check_quick_experiment

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "quick"


def without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in csv.DictReader(open(path, newline=""))]


def test_the_committed_quick_hacking_summary_is_reproduced_exactly(tmp_path, capsys):
    assert main(["experiment", "hacking", "--quick", "--out", str(tmp_path / "hacking")]) == 0
    check_quick_experiment("hacking", tmp_path / "hacking", capsys.readouterr().out)  # the end-to-end test of hacking
    committed = without_timing(COMMITTED / "hacking" / "summary.csv")
    assert committed and {"train_s", "s_per_step"} <= set(next(csv.DictReader(open(COMMITTED / "hacking" / "summary.csv"))))
    assert without_timing(tmp_path / "hacking" / "summary.csv") == committed
    intervals = [r for r in csv.DictReader(open(tmp_path / "hacking" / "intervals.csv")) if not r["quantity"].startswith("ratio_")]
    assert intervals == [r for r in csv.DictReader(open(COMMITTED / "hacking" / "intervals.csv")) if not r["quantity"].startswith("ratio_")]


def test_every_committed_quick_experiment_has_its_two_data_files():
    for name in ("hacking", "compute-matched", "frontier"):
        for data in ("summary.csv", "intervals.csv"):
            rows = list(csv.DictReader(open(COMMITTED / name / data)))
            assert rows and ("method" in rows[0]), (name, data)
