"""The comparison protocol (experiments/protocol.py) on hand-made rows and test chains: equal grids, selection on
validation (overall and within a divergence budget), and the hierarchical bootstrap's intervals."""

from __future__ import annotations

import csv

import numpy as np

from cmalign.experiments import protocol as p


def test_every_method_gets_a_grid_of_the_same_size_over_its_own_knob():
    grids = {m: p.tuning_grid(m, quick=False, num_steps=4) for m in p.KNOBS}
    assert {len(g) for g in grids.values()} == {4}
    assert {c["lr"] for g in grids.values() for c in g} == set(p.LRS)
    assert sorted(c["backprop_steps"] for c in grids["draft"]) == [1, 1, 4, 4]  # DRaFT-1 and DRaFT-K (AlignProp)
    assert p.cell_overrides("rlcm", grids["rlcm"][0]) == {"lr": 1e-4, "ppo.clip": 1e-4}
    assert all(len(p.tuning_grid(m, quick=True, num_steps=4)) == 1 for m in p.KNOBS)  # --quick: the same path, one cell


def row(method, seed, val_gold, kl=0.1, **hp):
    return {"method": method, "lr": 1e-3, **hp, "seed": seed, "selected": 0, "val_gold": val_gold, "val_kl_to_base": kl,
            "train_s": 10.0 + seed, "s_per_step": 0.1}


def test_the_cell_of_best_seed_mean_validation_gold_is_selected_overall_and_within_a_budget():
    rows = [row("rocm", 0, 7.0, kl=0.3, beta=3.0), row("rocm", 1, 7.4, kl=0.3, beta=3.0),  # mean 7.2, KL 0.3
            row("rocm", 0, 7.3, kl=0.1, beta=6.0), row("rocm", 1, 7.0, kl=0.1, beta=6.0),  # mean 7.15, KL 0.1
            row("rlcm", 0, 6.0, clip=1e-4), row("rlcm", 1, 6.0, clip=1e-4)]
    best = p.mark_selected(rows)
    assert best == {"rocm": (("lr", 1e-3), ("beta", 3.0)), "rlcm": (("lr", 1e-3), ("clip", 1e-4))}
    assert [r["selected"] for r in rows] == [1, 1, 0, 0, 1, 1]  # every seed of the selected cell
    assert p.select(rows, within=("val_kl_to_base", 0.2))["rocm"] == (("lr", 1e-3), ("beta", 6.0))
    assert p.select(rows, within=("val_kl_to_base", 0.05)) == {}


def test_the_bootstrap_is_deterministic_paired_and_resamples_seeds_then_chains():
    rng = np.random.default_rng(1)
    a = rng.normal(7.0, 1.0, size=(3, 200))
    assert p.bootstrap([a]) == p.bootstrap([a])  # the same RNG seed for every quantity
    estimate, lo, hi = p.bootstrap([a])
    assert abs(estimate - a.mean()) < 1e-12 and lo < estimate < hi
    # paired: a gap to a copy shifted by 0.5 has no spread at all
    assert np.allclose(p.bootstrap([a + 0.5, a], np.subtract), 0.5, atol=1e-12)
    # seeds far apart: the interval spans them (seeds resampled), where one seed's chains alone would not
    spread = np.stack([a[0] - 1.0, a[1], a[2] + 1.0])
    _, lo_spread, hi_spread = p.bootstrap([spread])
    _, lo_one, hi_one = p.bootstrap([spread[1:2]])
    assert hi_spread - lo_spread > 3 * (hi_one - lo_one)


def test_gaps_and_ratios_compare_the_reference_arms_selected_cell_with_every_other():
    rows = [row("rocm", s, 7.0, beta=3.0) for s in range(2)] + [row("rlcm", s, 6.0, clip=1e-4) for s in range(2)]
    for r in rows[2:]:
        r["train_s"] *= 4  # rlcm takes four times as long, seed by seed
    selected = p.mark_selected(rows)
    chains = {(r["method"], p.cell_of(r), r["seed"]): {"gold": np.full(5, 7.0 if r["method"] == "rocm" else 6.0)} for r in rows}
    gaps = p.gap_intervals(chains, selected, "rocm", ("test_gold",))
    assert [(g["quantity"], g["method"], g["versus"], g["estimate"], g["lo"], g["hi"], g["seeds"], g["n_test"]) for g in gaps] == \
        [("gap_test_gold", "rocm", "rlcm", 1.0, 1.0, 1.0, 2, 5)]
    (ratio, _) = p.ratio_intervals(rows, selected, "rocm")
    assert (ratio["quantity"], ratio["estimate"], ratio["lo"], ratio["hi"], ratio["n_test"]) == ("ratio_train_s", 0.25, 0.25, 0.25, "")


def test_the_data_files_have_one_set_of_columns(tmp_path):
    rows = [row("rocm", 0, 7.0, beta=3.0), row("draft", 0, 6.0, backprop_steps=4)]
    intervals = [p.interval_row("test_gold", "rocm", "", (7.0, 6.5, 7.5), 1, 500)]
    p.write_data(tmp_path, rows, intervals, "title")
    header = next(csv.reader(open(tmp_path / "summary.csv")))
    assert header[:4] == ["method", "lr", "beta", "backprop_steps"] and header[4] == "seed"
    assert next(csv.reader(open(tmp_path / "intervals.csv"))) == ["quantity", "method", "versus", "estimate", "lo", "hi", "seeds", "n_test"]
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "intervals.md").is_file()


def curve(*points):
    """metrics rows of a run: (step, train seconds, validation gold, KL to base) at each evaluation."""
    return [{"step": s, "wall_time": t, "eval_gold": g, "eval_kl_to_base": kl} for s, t, g, kl in points]


def test_the_time_to_the_other_arms_best_gold_is_taken_seed_by_seed_and_optionally_within_its_kl():
    rlcm = [curve((0, 0, 9.0, 0.0), (10, 10, 6.0, 0.3), (20, 20, 6.5, 0.4), (30, 30, 6.2, 0.5)),  # best 6.5 at 20 s, KL 0.4
            curve((0, 0, 9.0, 0.0), (10, 10, 7.0, 0.2), (20, 20, 6.0, 0.6))]  # best 7.0 at 10 s, KL 0.2
    # seed 0 reaches 6.5 at 4 s but beyond KL 0.4, within it at 12 s; seed 1 reaches 7.0 at 5 s within KL 0.2
    rocm = [curve((0, 0, 9.0, 0.0), (5, 4, 6.6, 0.9), (10, 12, 6.5, 0.35)), curve((0, 0, 9.0, 0.0), (5, 5, 7.1, 0.1))]
    seeded = {("rocm", "a"): rocm, ("rlcm", "b"): rlcm}
    chosen = {"rocm": ("rocm", "a"), "rlcm": ("rlcm", "b")}
    (plain,) = p.target_ratio_intervals(seeded, chosen, "rocm")  # step 0 (gold 9.0, the base model) is no target
    assert (plain["quantity"], plain["versus"], plain["seeds"]) == ("ratio_s_to_target", "rlcm", 2)
    assert plain["estimate"] == p.significant((4 + 5) / (20 + 10))
    (held,) = p.target_ratio_intervals(seeded, chosen, "rocm", within_kl=True)
    assert held["quantity"] == "ratio_s_to_target_within_kl" and held["estimate"] == p.significant((12 + 5) / (20 + 10))
    never = {**seeded, ("rocm", "a"): [curve((0, 0, 9.0, 0.0), (5, 4, 6.0, 0.1)), rocm[1]]}
    assert p.target_ratio_intervals(never, chosen, "rocm")[0]["hi"] == float("inf")  # a seed that never gets there
