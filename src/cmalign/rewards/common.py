"""Pieces the text-to-image reward models share: tensor-side image preprocessing (differentiable:
no PIL, no uint8 rounding), checkpoint reading, and the linear score head of LAION's aesthetic
predictor and ImageReward."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..precision import WEIGHT_DTYPES

# OpenAI CLIP's normalisation, also used by open_clip ViT-H (HPSv2, PickScore) and BLIP (ImageReward)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (bicubic, antialiased, as the models' PIL pipelines), then a centre crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return images[..., top : top + size, left : left + size]


def model_pixels(images01: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> the normalised `size` x `size` input of a CLIP/BLIP vision tower."""
    x = resize_center_crop(images01.float(), size)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def reward_dtype(config) -> torch.dtype:
    """Frozen reward weights follow the training config's mixed precision (float32 without a config)."""
    return WEIGHT_DTYPES.get(getattr(config, "mixed_precision", "no"), torch.float32)


def freeze(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle read with weights_only=True (published
    reward checkpoints are .pt/.pth). A {"state_dict": ...} wrapper and DDP's "module." are removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not a readable tensor checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict):
        raise UserError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


class LinearHead(torch.nn.Module):
    """The score head of LAION's improved aesthetic predictor and of ImageReward: Linear layers at
    indices layers.0, .2, .4, .6, .7 with Dropouts (inactive at inference) and no nonlinearity between."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str = "layers."):
        super().__init__()
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
        indices = sorted(int(m[1]) for k in tensors if (m := pattern.match(k)))
        if not indices:
            raise UserError(f"no linear layers named {prefix}N.weight in the score-head checkpoint")
        layers = []
        for i in indices:
            weight, bias = tensors[f"{prefix}{i}.weight"], tensors[f"{prefix}{i}.bias"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": bias})
            layers.append(layer)
        self.layers = torch.nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
