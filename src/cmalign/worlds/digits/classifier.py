"""An independent digit classifier (a small CNN trained with noise and shift augmentation).

It measures class accuracy of generated digits ("does the image still show the prompted
class?"), independently of the gold and of the proxy; cached as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cmalign.cache import build_lock, cache_root, manifest, publish_dir, shipped_asset, staging_dir
from cmalign.worlds.digits.data import NUM_CLASSES, data_hash, digits_dataset

HELD_OUT = 297


class DigitCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, NUM_CLASSES),
        )

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Class logits for images in [0, 1]."""
        return self.body(images01 * 2 - 1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts, pixel noise and random stroke thickening: a bolder digit is still the same digit to
    a person, so accuracy must not punish the style the gold prefers, only lost identity."""
    shifts = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    bold = torch.rand(len(x), 1, 1, 1, generator=gen) * 0.5
    x = torch.lerp(x, F.max_pool2d(x, 3, stride=1, padding=1), bold)
    return (x + 0.15 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


@torch.enable_grad()
def train_classifier(resolution: int = 8, steps: int = 1500, seed: int = 0) -> tuple[DigitCNN, float]:
    """Train on all but HELD_OUT random digits; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (x_tr, y_tr), (x_te, y_te) = split(resolution, gen)
    model = DigitCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (128,), generator=gen)
        loss = F.cross_entropy(model.body(_augment(x_tr[idx], gen)), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, held_out_accuracy(model, x_te, y_te)


def split(resolution: int, gen: torch.Generator):
    """((train images, labels), (HELD_OUT held-out images, labels)), a random split drawn from gen."""
    x, y = digits_dataset(resolution)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:-HELD_OUT], perm[-HELD_OUT:]
    return (x[train], y[train]), (x[test], y[test])


def held_out_accuracy(model: DigitCNN, x_te: torch.Tensor, y_te: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.body(x_te).argmax(1) == y_te).float().mean().item()


def classifier_key(resolution: int) -> str:
    return f"classifier-v2-r{resolution}-{data_hash()}"


def shipped_classifier(resolution: int) -> Path | None:
    """The classifier that ships inside the package for this resolution and this copy of the digits data
    (float32, built by train_classifier with its defaults; its manifest records the held-out accuracy)."""
    return shipped_asset(classifier_key(resolution))


def load_classifier(resolution: int = 8) -> DigitCNN:
    """The classifier for this resolution: the cache's, else the shipped one, else trained on first use
    (~20 s at 8x8, ~65 s at 16x16 on one core) into the cache."""
    folder = cache_root() / "digits" / classifier_key(resolution)
    model = DigitCNN()
    if not folder.exists() and (shipped := shipped_classifier(resolution)) is not None:
        folder = shipped
    if not folder.exists():
        with build_lock(folder):
            if not folder.exists():
                trained, accuracy = train_classifier(resolution)
                tmp = staging_dir(folder)
                save_file(trained.state_dict(), str(tmp / "classifier.safetensors"))
                (tmp / "manifest.json").write_text(json.dumps(manifest(kind="digits-classifier", held_out_accuracy=accuracy,
                                                                       held_out=HELD_OUT, resolution=resolution)))
                publish_dir(tmp, folder)
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.eval().requires_grad_(False)
