"""Each experiment runs end to end in --quick mode (tiny digits models) and writes its tables and plots.
divergences runs after beta-sweep in the same folder, so that it reads that sweep's best betas."""

from __future__ import annotations

import csv

import pytest

from cmalign.cli import main
from cmalign.experiments import EXPERIMENTS

GROUPS = [("hacking",), ("compute-matched",), ("ablations",), ("beta-sweep", "divergences"), ("generalization",), ("scaling",)]


def test_every_experiment_is_tested():
    assert sorted(n for g in GROUPS for n in g) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("names", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_experiment_quick_end_to_end(tmp_path, names, capsys):
    for name in names:
        out = tmp_path / f"{name}-quick"
        assert main(["experiment", name, "--quick", "--out", str(out)]) == 0
        assert "README.md" in capsys.readouterr().out
        for f in ("README.md", "summary.md", "summary.csv"):
            assert (out / f).is_file(), f
        assert list(out.glob("*.png"))
        rows = list(csv.DictReader(open(out / "summary.csv")))
        assert rows and all(any(("gold_final" in k or "tuned_gold" in k) and v not in (None, "") for k, v in r.items()) for r in rows)
        text = (out / "README.md").read_text()
        assert f"cmalign experiment {name} --quick" in text and "|" in text
    if "divergences" in names:  # it reused the sweep beside it rather than running its own
        assert not (tmp_path / "divergences-quick" / "beta-sweep").exists()


def test_unknown_experiment_is_one_error_line(capsys):
    assert main(["experiment", "nope", "--quick"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
