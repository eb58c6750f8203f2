"""Compositional digits (`--digits.grid N`): an N x N grid of 8x8 digits in one (1, 8N, 8N) image.

The prompt names every cell's digit, row by row ("a 2x2 grid of handwritten digits: seven two / one zero");
the base model is conditioned on the N² per-cell classes; gold, proxy, held-out proxy, classifier accuracy
and diversity are the 8x8 lab's functions applied to each cell and averaged over the cells. Unlike
upsampling (16x16 = the same 64 degrees of freedom, interpolated), the intrinsic dimension of the task
grows N²-fold: each cell is an independent digit with its own class.

- Data: each training image is N² digits drawn independently and uniformly from scikit-learn's 1,797
  (a fresh composition every time, so the teacher never sees the same grid twice).
- Network (`GridUNet`): the 8x8 world's UNet2DModel family at side 8N whose input carries, beside the
  noisy image, a class-embedding map: every pixel of cell k gets the learned E-dim embedding of cell k's
  class (11 embeddings: ten classes + the null class of classifier-free guidance; dropout nulls every cell
  of an image at once, so guidance contrasts "these classes" with "no classes"). Timestep embedding,
  v-prediction on the cosine schedule, distillation and the LoRA targets are those of the 8x8 model.
- Proxy: the 8x8 Bradley–Terry ProxyCNN applied to each cell and averaged, fitted on CELL pairs cut from
  pairs of grid samples of one prompt (same class per cell pair), labelled ~ sigmoid(gold_a - gold_b) of
  the cell. Why per cell and not on whole-grid pairs: gold is a per-cell mean, so this is the right
  structure; per-cell labels have the 8x8 lab's noise level (a label on the grid's mean gold would be
  noisier, the mean's spread shrinking with N), and the same rater budget (proxy_pairs cell labels) serves
  every N. The held-out proxy is the same with seed 1, exactly as at 8x8.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from cmalign.errors import UserError
from cmalign.worlds.digits.cells import CELL, per_cell_mean, to_cells
from cmalign.worlds.digits.data import CLASS_WORDS, NUM_CLASSES, WORD_TO_CLASS, class_prompt
from cmalign.worlds.digits.gold import gold_components
from cmalign.worlds.digits.pretrain import PretrainConfig, grid_pretrain_config
from cmalign.worlds.digits.proxy import fit_and_publish, gold_labelled_pairs
from cmalign.worlds.digits.world import DigitsWorld

_HEAD = re.compile(r"^\s*an?\s+(\d+)\s*x\s*(\d+)\s+grid\b[^:]*:(.*)$", re.IGNORECASE | re.DOTALL)


# --- prompts ----------------------------------------------------------------------------------------
def grid_prompt(labels, n: int) -> str:
    """The prompt naming each cell's class row by row, e.g. 'a 2x2 grid of handwritten digits: seven two / one zero'."""
    labels = [int(c) for c in labels]
    if len(labels) != n * n:
        raise ValueError(f"a {n}x{n} grid needs {n * n} labels, got {len(labels)}")
    rows = [" ".join(CLASS_WORDS[c] for c in labels[r * n : (r + 1) * n]) for r in range(n)]
    return f"a {n}x{n} grid of handwritten digits: " + " / ".join(rows)


def grid_size_of(prompt: str) -> int | None:
    """N if the prompt is a grid prompt ('a NxN grid ...: ...'), else None."""
    m = _HEAD.match(prompt)
    return int(m.group(1)) if m and m.group(1) == m.group(2) else None


def parse_grid_prompt(prompt: str, n: int) -> list[int]:
    """The N² cell classes (row-major) of a grid prompt; rows separated by '/' (optional), a cell is a class word
    or a single digit. Anything else is a ValueError that names the expected form."""
    expected = f"expected e.g. {grid_prompt([(3 * k) % NUM_CLASSES for k in range(n * n)], n)!r}"
    m = _HEAD.match(prompt)
    if not m:
        raise ValueError(f"prompt {prompt!r} is not a grid prompt; {expected}")
    if not (int(m.group(1)) == int(m.group(2)) == n):
        raise ValueError(f"prompt {prompt!r} names a {m.group(1)}x{m.group(2)} grid, this world draws {n}x{n}; {expected}")
    rows = [r for r in m.group(3).split("/")]
    cells = []
    for row in rows:
        tokens = re.findall(r"[a-z]+|\d+", row.lower())
        bad = [t for t in tokens if t not in WORD_TO_CLASS and not (t.isdigit() and len(t) == 1)]
        if bad:
            raise ValueError(f"prompt {prompt!r}: {bad[0]!r} is not a digit class; {expected}")
        got = [WORD_TO_CLASS[t] if t in WORD_TO_CLASS else int(t) for t in tokens]
        if len(rows) > 1 and len(got) != n:
            raise ValueError(f"prompt {prompt!r}: every row must name {n} digits; {expected}")
        cells += got
    if len(cells) != n * n:
        raise ValueError(f"prompt {prompt!r} names {len(cells)} digits, a {n}x{n} grid needs {n * n}; {expected}")
    return cells


def default_grid_prompts(n: int, num_train: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): num_train random compositions (seeded, distinct) and ten evaluation grids in which every
    cell position shows every class exactly once (cell k of prompt i: class (i + 7k) mod 10), none of them a
    training grid."""
    evaluation = [grid_prompt([(i + 7 * k) % NUM_CLASSES for k in range(n * n)], n) for i in range(NUM_CLASSES)]
    gen = torch.Generator().manual_seed(seed)
    seen, train = set(evaluation), []
    target = min(num_train, NUM_CLASSES ** (n * n) - len(evaluation))
    while len(train) < target:
        p = grid_prompt(torch.randint(0, NUM_CLASSES, (n * n,), generator=gen).tolist(), n)
        if p not in seen:
            seen.add(p)
            train.append(p)
    return train, evaluation


def cell_labels(prompts: list[str], n: int) -> torch.Tensor:
    """(B, n²) class ids; a bad prompt is a UserError."""
    try:
        return torch.tensor([parse_grid_prompt(p, n) for p in prompts], dtype=torch.long)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cell_prompts(labels: torch.Tensor) -> list[str]:
    """The 8x8 lab's prompt of each cell, flattened like to_cells."""
    return [class_prompt(int(c)) for c in labels.flatten()]


# --- the 8x8 functions per cell ---------------------------------------------------------------------
def grid_gold_components(images01: torch.Tensor, labels: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """The 8x8 gold and its terms of every cell, averaged over the cells of each image: (B,) each."""
    cells = to_cells(images01.detach().float().cpu(), n)
    return {k: per_cell_mean(v, n) for k, v in gold_components(cells, labels.reshape(-1).cpu()).items()}


class PerCell(nn.Module):
    """An 8x8 reward module (images01, prompts) -> (B,) applied to each cell of a grid and averaged."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n

    def forward(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = cell_labels(prompts, self.n)
        return per_cell_mean(self.module(to_cells(images01, self.n), cell_prompts(labels)), self.n)


def make_cell_pairs(world, num_pairs: int, num_steps: int = 4, seed: int = 0):
    """num_pairs CELL pairs cut from ceil(num_pairs / n²) pairs of base-model grids of one random prompt each; the
    label of a cell pair ~ Bernoulli(sigmoid(gold_a - gold_b)) of that cell, as in the 8x8 lab. Returns the
    PreferencePairs (8x8 images, class prompts) and the noiseless gold order."""
    n = world.grid
    gen = torch.Generator().manual_seed(seed)
    grids = math.ceil(num_pairs / (n * n))
    labels = torch.randint(0, NUM_CLASSES, (grids, n * n), generator=gen)
    prompts = [grid_prompt(row.tolist(), n) for row in labels]
    return gold_labelled_pairs(world, prompts, labels.reshape(-1)[:num_pairs], num_steps, gen, lambda x: to_cells(x, n))


# --- the world --------------------------------------------------------------------------------------
class GridDigitsWorld(DigitsWorld):
    """The digits world on n x n grids (the same registered world `digits`, for digits.grid > 1): the 8x8
    world's scores applied to each cell and averaged."""

    digit_resolution = CELL

    def __init__(self, network, grid: int, device="cpu", **lora):
        super().__init__(network, grid * CELL, device, **lora)
        self.grid = grid

    @classmethod
    def pretrain_recipe(cls, resolution: int, model_size: str, grid: int = 2, **steps) -> PretrainConfig:
        """The grid's own recipe (pretrain.GRID_RECIPES): 8x8 cells whatever `resolution` says."""
        return grid_pretrain_config(grid, model_size, **steps)

    @classmethod
    def around(cls, network, pretrain: PretrainConfig, device="cpu", **lora) -> "GridDigitsWorld":
        return cls(network, pretrain.grid, device, **lora)

    def default_prompts(self):
        return default_grid_prompts(self.grid)

    def encode_prompts(self, prompts):
        return cell_labels(prompts, self.grid).to(self.device)

    def gold(self, images01, prompts):
        return grid_gold_components(images01, cell_labels(prompts, self.grid), self.grid)["gold"]

    def gold_components(self, images01, labels):
        return grid_gold_components(images01, labels, self.grid)

    def accuracy(self, classifier, images01, labels):
        """Share of each image's cells that the independent 8x8 classifier reads as their prompted class."""
        hit = classifier(to_cells(images01.float().cpu(), self.grid)).argmax(1) == labels.reshape(-1).cpu()
        return per_cell_mean(hit.float(), self.grid)

    def diversity(self, images01, prompts):
        """The 8x8 diversity (mean pairwise L2 between samples of one prompt) of each cell position, averaged over
        the positions: a grid's own L2 would grow like n with the number of cells."""
        n = self.grid
        cells = to_cells(images01.detach().float().cpu(), n).reshape(len(prompts), n * n, 1, CELL, CELL)
        values = [super(GridDigitsWorld, self).diversity(cells[:, k], prompts) for k in range(n * n)]
        return float(sum(values) / len(values))

    def image_reward(self, module):
        """An 8x8 reward module scores each cell, averaged."""
        if isinstance(module, PerCell):
            return module
        if getattr(module, "config", {}).get("resolution", 8) != CELL:
            raise UserError(f"a {self.grid}x{self.grid} digits grid needs an 8x8 (per-cell) digits proxy, not a "
                            f"{module.config['resolution']}x{module.config['resolution']} one")
        return PerCell(module, self.grid)

    def build_proxy(self, folder: Path, num_pairs: int, seed: int, num_steps: int, progress: bool, info: dict) -> None:
        """The 8x8 ProxyCNN fitted on gold-labelled CELL pairs of this base model's grids."""
        if progress:
            print(f"cmalign: training the {self.grid}x{self.grid} digits proxy reward on {num_pairs} gold-labelled cell "
                  f"pairs -> {folder}", flush=True)
        fit_and_publish(folder, lambda k, s: make_cell_pairs(self, k, num_steps, s), CELL, num_pairs, seed,
                        {**info, "grid": self.grid, "pairs": "cells of grid pairs"})
