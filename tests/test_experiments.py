"""Each experiment runs end to end in --quick mode (tiny digits models) and writes its tables and plots."""

from __future__ import annotations

import csv

import pytest

from cmalign.cli import main
from cmalign.experiments import EXPERIMENTS


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_quick_end_to_end(tmp_path, name, capsys):
    out = tmp_path / name
    assert main(["experiment", name, "--quick", "--out", str(out)]) == 0
    assert "README.md" in capsys.readouterr().out
    for f in ("README.md", "summary.md", "summary.csv"):
        assert (out / f).is_file(), f
    assert list(out.glob("*.png"))
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert rows and all(r.get("gold_final") not in (None, "") for r in rows)
    text = (out / "README.md").read_text()
    assert f"cmalign experiment {name} --quick" in text and "|" in text


def test_unknown_experiment_is_one_error_line(capsys):
    assert main(["experiment", "nope", "--quick"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
