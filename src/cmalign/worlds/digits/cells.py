"""Compositional digits' geometry: an N x N grid of 8x8 cells in one (C, 8N, 8N) image, and endless training
batches of independent uniform compositions of scikit-learn's digits (pretraining of the grid base models)."""

from __future__ import annotations

import torch

from cmalign.errors import UserError
from cmalign.worlds.digits.data import digits_dataset

CELL = 8


def to_cells(images: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, 8n, 8n) -> (B * n², C, 8, 8), cells row-major within each image."""
    b, c, h, w = images.shape
    if h != n * CELL or w != n * CELL:
        raise UserError(f"a {n}x{n} digits grid is {n * CELL}x{n * CELL} pixels, got {h}x{w}")
    x = images.reshape(b, c, n, CELL, n, CELL).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, CELL, CELL)


def from_cells(cells: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of to_cells."""
    bn, c = cells.shape[:2]
    x = cells.reshape(bn // (n * n), n, n, c, CELL, CELL).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(bn // (n * n), c, n * CELL, n * CELL)


def per_cell_mean(values: torch.Tensor, n: int) -> torch.Tensor:
    """(B * n²,) values of the cells -> (B,) their mean per image."""
    return values.reshape(-1, n * n).mean(1)


def grid_batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless (images (B, 1, 8n, 8n) in [-1, 1], labels (B, n²)) of independent uniform compositions."""
    x, y = digits_dataset(CELL)
    while True:
        idx = torch.randint(0, len(x), (batch_size * n * n,), generator=gen)
        yield from_cells(x[idx], n), y[idx].view(batch_size, n * n)
