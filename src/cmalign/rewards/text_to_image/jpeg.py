"""JPEG compressibility and incompressibility (DDPO's tasks): the size of the image saved as JPEG
(quality 95) in kilobytes, negated for compressibility. Not differentiable: for policy-gradient
methods and evaluation."""

from __future__ import annotations

import io

import torch
from PIL import Image

from cmalign.rewards.registry import Reward

JPEG_QUALITY = 95


def jpeg_kilobytes(images01: torch.Tensor) -> torch.Tensor:
    """(B,) JPEG sizes in kB of images in [0, 1], (B, C, H, W) with C = 1 or 3."""
    pixels = (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    sizes = []
    for image in pixels:
        array = image.squeeze(0).numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images01.device)


class JpegSize(Reward):
    differentiable = False

    def __init__(self, name: str, sign: float):
        self.name, self.sign = name, sign

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_kilobytes(images)
