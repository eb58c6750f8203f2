"""Shared helpers of the test-suite: tiny, fast configurations of the digits world."""

from __future__ import annotations

import dataclasses

from cmalign.config import TrainConfig

TINY = dict(
    digits_model_size="tiny",
    pretrain_teacher_steps=40,
    pretrain_distill_steps=30,
    proxy_pairs=200,
    batch_size=8,
    steps=4,
    eval_every=2,
    grid_every=2,
    eval_size=20,
    final_eval_size=20,
    threads=1,
)

TINY_ARGS = [
    "--digits-model-size", "tiny", "--pretrain-teacher-steps", "40", "--pretrain-distill-steps", "30",
    "--proxy-pairs", "200", "--batch-size", "8", "--eval-every", "2", "--grid-every", "2",
    "--eval-size", "20", "--final-eval-size", "20", "--threads", "1",
]


def tiny_config(**overrides) -> TrainConfig:
    return dataclasses.replace(TrainConfig(**TINY), **overrides)
