"""The set-up the digits ROCM benchmarks share: the default digits world, its reward, an AdamW step over the
adapter and the prompts of a batch (imported by the scripts beside it, which run from this folder)."""

from __future__ import annotations

import torch

from cmalign.config import TrainConfig
from cmalign.rewards.registry import build_weighted, reward_context
from cmalign.training.build import build_world

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_rocm(base: TrainConfig):
    """(world, reward, trainable parameters, optimizer_step) for ROCM steps on base's digits world on the CPU;
    optimizer_step(loss) is the trainer's update without its bookkeeping: backward, clip to norm 1, AdamW."""
    world = build_world(base, "cpu")
    reward = build_weighted(base.reward_weights, reward_context(world, base, "cpu"))
    params = world.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def optimizer_step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return 0.0

    return world, reward, params, optimizer_step


def digit_prompts(n: int) -> list[str]:
    """n prompts cycling through the ten classes."""
    return [f"a handwritten {DIGITS[i % 10]}" for i in range(n)]
