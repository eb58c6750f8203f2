"""cfg.mixed_precision -> the dtype of frozen weights (trainable LoRA parameters stay float32)."""

from __future__ import annotations

import torch

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
