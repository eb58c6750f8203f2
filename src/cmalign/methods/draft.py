"""DRaFT-K / AlignProp: ROCM's reward back-propagation with beta = 0 (no divergence to the reference)
and truncated back-propagation through the last `backprop_steps` steps only (DRaFT-K; 1 by default,
i.e. DRaFT-1; backprop_steps = K is AlignProp's full back-propagation). The earlier steps run under
no_grad and their output is detached (chain.run_chain)."""

from __future__ import annotations

import dataclasses

from cmalign.errors import UserError
from cmalign.methods.rocm import Rocm


class Draft(Rocm):
    name = "draft"
    needs_differentiable_reward = True  # DRaFT is the pathwise gradient only (no score-function term)
    score_function_rewards = False

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.beta != 0:
            raise UserError(f"draft (DRaFT-K / AlignProp) has no divergence term: pass --beta 0 (got {cfg.beta:g}), "
                            "or use --method rocm for the regularised objective")

    def __init__(self, cfg, world, reward):
        # DRaFT-1 unless backprop_steps says otherwise; the run's config keeps what the user gave
        k = 1 if cfg.backprop_steps is None else cfg.backprop_steps
        super().__init__(dataclasses.replace(cfg, beta=0.0, backprop_steps=min(k, cfg.num_steps)), world, reward)
