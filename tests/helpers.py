"""Shared helpers of the test-suite: tiny, fast configurations of the digits world."""

from __future__ import annotations

from cmalign.config import TrainConfig, with_changes

TINY = {
    "digits.model_size": "tiny",
    "digits.pretrain_teacher_steps": 40,
    "digits.pretrain_distill_steps": 30,
    "digits.proxy_pairs": 200,
    "batch_size": 8,
    "steps": 4,
    "eval_every": 2,
    "grid_every": 2,
    "eval_size": 20,
    "final_eval_size": 20,
    "threads": 1,
}

TINY_ARGS = [
    "--digits.model-size", "tiny", "--digits.pretrain-teacher-steps", "40", "--digits.pretrain-distill-steps", "30",
    "--digits.proxy-pairs", "200", "--batch-size", "8", "--eval-every", "2", "--grid-every", "2",
    "--eval-size", "20", "--final-eval-size", "20", "--threads", "1",
]


def tiny_config(**overrides) -> TrainConfig:
    """TINY with overrides: common fields, or "section.field" keys (`**{"digits.grid": 2}`)."""
    return with_changes(TrainConfig(), **{**TINY, **overrides})


# The experiments that follow the comparison protocol: summary.csv a row per run, intervals.csv beside it.
PROTOCOL_EXPERIMENTS = ("hacking", "compute-matched", "frontier", "nondiff", "generalization", "finetune-mode", "scaling", "scaling-grid")


def check_quick_experiment(name: str, out, printed: str) -> None:
    """What every `cmalign experiment NAME --quick --out OUT` writes: its README (with the command), tables, plots;
    protocol experiments also a row per run with the selected cells marked, and intervals of those cells."""
    import csv

    assert "README.md" in printed
    for f in ("README.md", "summary.md", "summary.csv"):
        assert (out / f).is_file(), f
    assert list(out.glob("*.png"))
    rows = list(csv.DictReader(open(out / "summary.csv")))
    gold = lambda k: "gold_final" in k or "tuned_gold" in k or (k.startswith("test_") and "gold" in k)  # noqa: E731
    assert rows and all(any(gold(k) and v not in (None, "") for k, v in r.items()) for r in rows)
    if name in PROTOCOL_EXPERIMENTS:
        assert {"method", "seed", "selected", "val_gold"} <= set(rows[0]) and any(r["selected"] == "1" for r in rows)
        quantities = list(csv.DictReader(open(out / "intervals.csv")))
        assert {r["method"] for r in rows} == {q["method"] for q in quantities if not q["versus"]}
    text = (out / "README.md").read_text()
    assert f"cmalign experiment {name} --quick" in text and "|" in text
