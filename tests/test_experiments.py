"""Each experiment runs end to end in --quick mode (tiny digits models) and writes its tables and plots (hacking:
in test_results_quick.py).
divergences runs after beta-sweep in the same folder, so that it reads that sweep's best betas."""

from __future__ import annotations

import csv

import pytest

from cmalign.cli import main
from cmalign.experiments import EXPERIMENTS
from helpers import check_quick_experiment

GROUPS = [("compute-matched",), ("ablations",), ("beta-sweep", "divergences"), ("generalization",), ("scaling-grid",), ("frontier",), ("nondiff",), ("finetune-mode",)]


# run end to end elsewhere (with the same checks), so that the suite runs it once
ELSEWHERE = {"hacking": "test_results_quick.py, which also compares it with the committed results/quick/hacking",
             "scaling": "test_scaling_compares_the_selected_cells_setting_by_setting_over_seeds, with two seeds"}


def test_every_experiment_is_tested():
    assert sorted([n for g in GROUPS for n in g] + list(ELSEWHERE)) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("names", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_experiment_quick_end_to_end(tmp_path, names, capsys):
    for name in names:
        out = tmp_path / f"{name}-quick"
        assert main(["experiment", name, "--quick", "--out", str(out)]) == 0
        check_quick_experiment(name, out, capsys.readouterr().out)
    if "divergences" in names:  # it reused the sweep beside it rather than running its own
        assert not (tmp_path / "divergences-quick" / "beta-sweep").exists()


def test_unknown_experiment_is_one_error_line(capsys):
    assert main(["experiment", "nope", "--quick"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_the_scaling_experiments_16x16_base_model_ships_with_the_package(monkeypatch, tmp_path):
    """No 37-minute pretraining on first use: the recipe scaling names resolves to the shipped weights,
    whose manifest gives the command that rebuilds them."""
    import json

    from cmalign.config import TrainConfig
    from cmalign.experiments.scaling import PRETRAIN_16
    from cmalign.worlds.digits.factory import pretrain_config_for
    from cmalign.worlds.digits import cache

    monkeypatch.setenv("CMALIGN_CACHE", str(tmp_path / "empty-cache"))
    cfg = pretrain_config_for(TrainConfig(**{"digits.resolution": 16}, **PRETRAIN_16))
    folder = cache.locate(cfg, allow_pretrain=False)
    assert folder == cache.shipped_dir(cfg)
    info = json.loads((folder / "manifest.json").read_text())
    assert info["command"] == cache.pretrain_command(cfg) and info["config"]["resolution"] == 16
    net, _, _ = cache.load_base(cfg, allow_pretrain=False)
    assert net.config.sample_size == 16


@pytest.mark.xdist_group("multiprocess")
def test_runs_trained_in_parallel_workers_equal_the_runs_trained_in_order(tmp_path, capsys):
    """--jobs 2 trains the runs in spawned worker processes; every number of the summary equals the committed quick
    summary, which was trained one run after another in one process (test_results_quick.py reproduces it that way)."""
    from test_results_quick import COMMITTED, without_timing

    out = tmp_path / "jobs2"
    assert main(["experiment", "hacking", "--quick", "--out", str(out), "--jobs", "2"]) == 0
    assert "2 at a time" in capsys.readouterr().out and "--jobs 2" in (out / "README.md").read_text()
    assert without_timing(out / "summary.csv") == without_timing(COMMITTED / "hacking" / "summary.csv")


def test_jobs_is_refused_where_runs_must_train_in_order(tmp_path, capsys):
    assert main(["experiment", "generalization", "--quick", "--out", str(tmp_path), "--jobs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs does not apply" in err[0]


def test_scaling_compares_the_selected_cells_setting_by_setting_over_seeds(tmp_path, capsys):
    """Every setting (8x8 and 16x16 here) is its own comparison under the protocol: both arms' grids at that setting,
    one selection each, ROCM's gap and time ratios to RLCM over the seeds, the rows tagged with the setting."""
    out = tmp_path / "scaling-quick"
    assert main(["experiment", "scaling", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    check_quick_experiment("scaling", out, capsys.readouterr().out)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted((r["setting"], r["method"], r["seed"]) for r in rows) == sorted(
        (s, m, str(seed)) for s in ("r8-k2", "r16-k2") for m in ("rocm", "rlcm") for seed in (0, 1))
    assert all(r["selected"] == "1" for r in rows)  # --quick: one cell per arm
    ratios = [q for q in csv.DictReader(open(out / "intervals.csv")) if q["quantity"] == "ratio_s_to_target"]
    assert sorted(q["setting"] for q in ratios) == ["r16-k2", "r8-k2"] and {q["seeds"] for q in ratios} == {"2"}
    assert {q["method"] + "/" + q["versus"] for q in ratios} == {"rocm/rlcm"}
    assert [r["setting"] for r in csv.DictReader(open(out / "ratios.csv"))] == ["r8-k2", "r16-k2"]
    assert sorted(p.name for p in (out / "runs" / "r16-k2-rocm-lr0.001-beta3").iterdir()) == ["seed0", "seed1"]


def test_the_frontier_grid_is_compute_matcheds_run_for_run(tmp_path):
    """The frontier only scores compute-matched's finished runs when they are copied into its folder: that holds
    while every full-size cell has the same configuration in both."""
    from cmalign.experiments import compute_matched, frontier

    steps, matched = compute_matched.grid(tmp_path, quick=False, threads=1, steps=None)
    frontier_steps, cells = frontier.grid(tmp_path, quick=False, threads=1, steps=None)
    assert frontier_steps == steps == 50 and cells.keys() == matched.keys() and len(cells) == 24
    assert all(cells[k][0] == matched[k][0] and cells[k][1] == matched[k][1] for k in cells)
