"""The frontier experiment's tables from hand-made evaluation points: Pareto fronts, best gold within a
divergence budget, time to a gold target within a budget, and ROCM's speed ratios to each baseline run."""

import math

from cmalign.experiments.frontier import best_within, pareto, speed_ratios, time_to


def pt(step, wall_time, gold, kl, distance=1.0):
    return {"step": step, "wall_time": wall_time, "gold": gold, "kl": kl, "distance": distance}


def test_pareto_keeps_only_points_nothing_beats_in_both():
    pts = [pt(0, 0, 5.0, 0.0), pt(1, 1, 6.0, 0.1), pt(2, 2, 5.5, 0.2), pt(3, 3, 7.0, 0.3), pt(4, 4, float("nan"), 0.05)]
    assert [p["step"] for p in pareto(pts, "kl")] == [0, 1, 3]  # 5.5 at 0.2 is beaten by 6.0 at 0.1; nan dropped


def test_best_within_and_time_to_respect_the_budget():
    pts = [pt(0, 0, 5.0, 0.0), pt(1, 10, 7.0, 0.08), pt(2, 20, 7.5, 0.3), pt(3, 30, 7.0, 0.05)]
    best, s = best_within(pts, "kl", 0.1)
    assert best["gold"] == 7.0 and s == 10  # the fastest point that reaches the best gold inside the budget
    assert best_within(pts, "kl", -1.0) == (None, None)
    assert time_to(pts, "kl", 0.1, 7.2) is None  # only the point outside the budget gets there
    assert time_to(pts, "kl", math.inf, 7.2) == 20
    assert time_to(pts, "kl", 0.06, 7.0) == 30


def test_speed_ratios_judge_a_collapsing_baseline_at_its_peak_and_hold_rocm_to_its_divergence():
    rlcm = [pt(0, 0, 5.0, 0.0), pt(10, 20, 7.8, 0.2), pt(20, 40, 2.0, 1.5)]  # fast peak, then collapse
    ddpo = [pt(0, 0, 5.4, math.nan, 0.0), pt(10, 100, 6.0, math.nan, 0.5)]  # distance plane only
    rocm_far = [pt(0, 0, 5.0, 0.0, 0.0), pt(10, 5, 7.9, 0.4, 2.0)]  # gets there first, but further away
    rocm_close = [pt(0, 0, 5.0, 0.0, 0.0), pt(10, 8, 6.1, 0.05, 0.4), pt(20, 12, 7.8, 0.15, 1.0)]
    curves = {("rlcm", 1e-3): rlcm, ("ddpo", 1e-4): ddpo, ("rocm-beta3", 1e-3): rocm_far, ("rocm-beta6", 1e-3): rocm_close}
    rows = {r["baseline"]: r for r in speed_ratios(curves, rocm_far + rocm_close)}
    assert set(rows) == {"rlcm", "ddpo"}  # no row for rocm itself
    r = rows["rlcm"]
    assert (r["best_gold"], r["s"], r["measure"], r["divergence_there"], r["gold_final"]) == (7.8, 20, "kl", 0.2, 2.0)
    assert (r["rocm_s_old"], r["ratio_old"]) == (5, 0.25)  # any ROCM point with the gold
    assert (r["rocm_s_within"], r["ratio_within"]) == (12, 0.6)  # only ROCM points at KL <= 0.2
    d = rows["ddpo"]
    assert d["measure"] == "distance" and d["divergence_there"] == 0.5
    assert (d["rocm_s_old"], d["rocm_s_within"], d["ratio_within"]) == (5, 8, 0.08)
    assert speed_ratios({("rlcm", 1e-3): rlcm}, [pt(0, 0, 5.0, 0.0)])[0]["ratio_old"] is None  # never reached
