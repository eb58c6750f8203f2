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
