"""DRaFT-K / AlignProp: ROCM's reward back-propagation with beta = 0 (no divergence to the reference)
and truncated back-propagation through the last `backprop_steps` steps only (DRaFT-K; 1 by default,
i.e. DRaFT-1; backprop_steps = K is AlignProp's full back-propagation). The earlier steps run under
no_grad and their output is detached (chain.run_chain)."""

from __future__ import annotations

import dataclasses

from .rocm import Rocm


class Draft(Rocm):
    name = "draft"

    def __init__(self, cfg, world, reward):
        k = 1 if cfg.backprop_steps is None else cfg.backprop_steps
        super().__init__(dataclasses.replace(cfg, beta=0.0, backprop_steps=min(k, cfg.num_steps)), world, reward)
