"""The committed data behind docs/RESULTS.md (issue 23): the experiments that compare methods were run under the
protocol with three seeds per method and every cell of each method's grid, with the command that made them in the
folder's README; the quick summaries and the table generator are tested in test_results_quick.py and
test_results_tables.py."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from cmalign.experiments.protocol import METHOD_ARMS, TEST_SIZE

RESULTS = Path(__file__).resolve().parents[1] / "results"
# experiment -> (the arms it compares, cells per arm)
COMMITTED = {"compute-matched": (set(METHOD_ARMS), 4), "frontier": (set(METHOD_ARMS), 4),
             "hacking": ({"rocm-beta0", "rocm-beta3"}, 1), "generalization": ({"rocm-beta0", "rocm-beta3", "rocm-beta6"}, 1),
             "finetune-mode": ({"lora", "full"}, 2), "nondiff": ({"rocm-hybrid", "rlcm", "ddpo", "rocm-proxy"}, 4),
             "scaling-grid": ({"rocm", "rlcm"}, 3 * 4),  # 4 cells at each of N = 1, 2, 3
             "scaling": ({"rocm", "rlcm"}, 4 * 4)}  # 4 cells at each of 8x8 K = 2, 4, 8 and 16x16 K = 4


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_each_method_has_three_seeds_of_every_cell_scored_on_the_test_chains(name):
    arms, cells = COMMITTED[name]
    rows = list(csv.DictReader(open(RESULTS / name / "summary.csv", newline="")))
    assert {r["method"] for r in rows} == arms
    seeds = defaultdict(set)
    for r in rows:
        seeds[tuple(r.get(k) for k in ("method", "lr", "beta", "clip", "backprop_steps", "setting"))].add(r["seed"])
        gold = r.get("test_gold", r.get("test_heldout_gold"))  # generalization scores each half of the classes
        assert int(r["n_test"]) == TEST_SIZE and gold not in (None, "", "nan")
    assert all(s == {"0", "1", "2"} for s in seeds.values()), seeds
    cells_per_method = Counter(cell[0] for cell in seeds)
    assert set(cells_per_method.values()) == {cells}, cells_per_method  # the whole equal grid
    assert {r["method"] for r in rows if r["selected"] == "1"} == arms  # a cell selected per method
    intervals = list(csv.DictReader(open(RESULTS / name / "intervals.csv", newline="")))
    assert {int(r["seeds"]) for r in intervals} == {3}
    assert "--seeds 3" in (RESULTS / name / "README.md").read_text()


def test_results_states_its_intervals():
    text = (RESULTS.parent / "docs" / "RESULTS.md").read_text()
    assert "95% interval" in text and "hierarchical bootstrap" in text
