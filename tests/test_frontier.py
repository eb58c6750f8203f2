"""The frontier's helpers on hand-made evaluation points (the scaling experiments use them): the time to a gold
target within a divergence budget. The protocol's selection within a budget: test_protocol.py."""

import math

from cmalign.experiments.frontier import time_to


def pt(step, wall_time, gold, kl, distance=1.0):
    return {"step": step, "wall_time": wall_time, "gold": gold, "kl": kl, "distance": distance}


def test_time_to_respects_the_budget():
    pts = [pt(0, 0, 5.0, 0.0), pt(1, 10, 7.0, 0.08), pt(2, 20, 7.5, 0.3), pt(3, 30, 7.0, 0.05)]
    assert time_to(pts, "kl", 0.1, 7.2) is None  # only the point outside the budget gets there
    assert time_to(pts, "kl", math.inf, 7.2) == 20
    assert time_to(pts, "kl", 0.06, 7.0) == 30
