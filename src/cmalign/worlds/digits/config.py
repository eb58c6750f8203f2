"""Settings of the digits world: the `digits` config section (`--digits.FIELD`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cmalign.errors import UserError


@dataclass
class DigitsConfig:
    """The embedded digits world."""

    resolution: int = 8
    """Image side of the digits world (8, or 16 by bilinear upsampling)."""
    model_size: Literal["base", "tiny"] = "base"
    """Base UNet size: base (1.1M parameters) or tiny (tests)."""
    proxy_pairs: int = 2000
    """Gold-labelled preference pairs the digits proxy reward model is trained on."""
    pretrain_teacher_steps: int | None = None
    """Override the DDPM teacher steps if pretraining runs (tests use few)."""
    pretrain_distill_steps: int | None = None
    """Override the distillation steps if pretraining runs (tests use few)."""
    proxy_path: str | None = None
    """Folder of a proxy trained by `cmalign reward-model train`; default: the cached one."""
    grid: int = 1
    """Compositional digits: N x N grid of 8x8 digits (2, 3, 4), prompt names every cell; scores per cell, averaged."""

    def check(self) -> None:
        if self.resolution not in (8, 16):
            raise UserError(f"digits.resolution must be 8 or 16, got {self.resolution}")
        if self.grid not in (1, 2, 3, 4):
            raise UserError(f"digits.grid must be 1, 2, 3 or 4, got {self.grid}")
        if self.grid != 1 and self.resolution != 8:
            raise UserError(f"digits.grid {self.grid} is a grid of 8x8 digits: digits.resolution must stay 8, got {self.resolution}")
        if self.proxy_pairs < 10:
            raise UserError(f"digits.proxy_pairs must be >= 10, got {self.proxy_pairs}")
        for name in ("pretrain_teacher_steps", "pretrain_distill_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"digits.{name} must be >= 1, got {value}")
