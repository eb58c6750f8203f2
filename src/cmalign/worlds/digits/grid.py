"""Compositional digits (`--digits-grid N`): an N x N grid of 8x8 digits in one (1, 8N, 8N) image.

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
from functools import lru_cache

import torch
import torch.nn as nn

from cmalign.errors import UserError
from cmalign.worlds.digits.world import DigitsWorld
from cmalign.worlds.digits.data import CLASS_WORDS, NUM_CLASSES, _raw_digits, class_prompt

CELL = 8
GRID_SIZES = (1, 2, 3, 4)
EMBED_CHANNELS = 8  # E: channels of the class-embedding map
_WORD_TO_CLASS = {w: i for i, w in enumerate(CLASS_WORDS)}
_HEAD = re.compile(r"^\s*an?\s+(\d+)\s*x\s*(\d+)\s+grid\b[^:]*:(.*)$", re.IGNORECASE | re.DOTALL)

# Pretraining recipes of the shipped grid base models: images per update chosen so that an update sees
# about the 8x8 recipe's 128 digits (32 x 4, 14 x 9, 8 x 16); step counts fitted to ~15 min on 2 cores.
RECIPES = {
    2: dict(batch_size=32, teacher_steps=1400, distill_steps=400),
    3: dict(batch_size=14, teacher_steps=1400, distill_steps=400),
    4: dict(batch_size=8, teacher_steps=1400, distill_steps=400),
}


def grid_pretrain_config(n: int, model_size: str = "base", **overrides):
    """The PretrainConfig of the n x n grid's base models (RECIPES[n], then overrides such as step counts)."""
    from cmalign.worlds.digits.pretrain import PretrainConfig

    if n not in RECIPES:
        raise UserError(f"digits grid must be 2, 3 or 4 for a grid recipe, got {n}")
    return PretrainConfig(resolution=CELL, model_size=model_size, grid=n, **{**RECIPES[n], **overrides})


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
        bad = [t for t in tokens if t not in _WORD_TO_CLASS and not (t.isdigit() and len(t) == 1)]
        if bad:
            raise ValueError(f"prompt {prompt!r}: {bad[0]!r} is not a digit class; {expected}")
        got = [_WORD_TO_CLASS[t] if t in _WORD_TO_CLASS else int(t) for t in tokens]
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


# --- cells ------------------------------------------------------------------------------------------
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


def cell_labels(prompts: list[str], n: int) -> torch.Tensor:
    """(B, n²) class ids; a bad prompt is a UserError."""
    try:
        return torch.tensor([parse_grid_prompt(p, n) for p in prompts], dtype=torch.long)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cell_prompts(labels: torch.Tensor) -> list[str]:
    """The 8x8 lab's prompt of each cell, flattened like to_cells."""
    return [class_prompt(int(c)) for c in labels.flatten()]


def per_cell_mean(values: torch.Tensor, n: int) -> torch.Tensor:
    return values.reshape(-1, n * n).mean(1)


# --- data -------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _raw_digits()
    return torch.from_numpy(images).unsqueeze(1) * 2 - 1, torch.from_numpy(labels)


def grid_batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless (images (B, 1, 8n, 8n) in [-1, 1], labels (B, n²)) of independent uniform compositions."""
    x, y = _digits_tensors()
    while True:
        idx = torch.randint(0, len(x), (batch_size * n * n,), generator=gen)
        yield from_cells(x[idx], n), y[idx].view(batch_size, n * n)


# --- network ----------------------------------------------------------------------------------------
class GridUNet(nn.Module):
    """UNet2DModel at side 8n whose input is the noisy image plus a per-cell class-embedding map.

    Called like the 8x8 model: net(x, t, class_labels=(B, n²) long).sample."""

    def __init__(self, n: int, size: str = "base", embed_channels: int = EMBED_CHANNELS):
        super().__init__()
        from diffusers import UNet2DModel

        from cmalign.worlds.digits.nets import UNET_SIZES

        if size not in UNET_SIZES:
            raise ValueError(f"unknown digits model size {size!r}; expected one of {sorted(UNET_SIZES)}")
        self.n = n
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, embed_channels)  # + the null class
        self.unet = UNet2DModel(
            sample_size=n * CELL, in_channels=1 + embed_channels, out_channels=1, layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=8, **UNET_SIZES[size],
        )

    def class_map(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, n²) -> (B, E, 8n, 8n): each cell's pixels carry its class's embedding."""
        b, n = labels.shape[0], self.n
        e = self.class_embedding(labels.view(b, n * n))  # (B, n², E)
        e = e.transpose(1, 2).reshape(b, -1, n, n)
        return e.repeat_interleave(CELL, 2).repeat_interleave(CELL, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor):
        cond = self.class_map(class_labels).to(x.dtype)
        return self.unet(torch.cat([x, cond], 1), t)


def build_grid_unet(size: str, n: int) -> GridUNet:
    return GridUNet(n, size)


# --- rewards and metrics per cell -------------------------------------------------------------------
def grid_gold_components(images01: torch.Tensor, labels: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """The 8x8 gold and its terms of every cell, averaged over the cells of each image: (B,) each."""
    from cmalign.worlds.digits.gold import gold_components

    cells = to_cells(images01.detach().float().cpu(), n)
    return {k: per_cell_mean(v, n) for k, v in gold_components(cells, labels.reshape(-1).cpu()).items()}


def grid_gold_score(images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    n = grid_size_of(prompts[0])
    return grid_gold_components(images01, cell_labels(prompts, n), n)["gold"]


class PerCell(nn.Module):
    """An 8x8 reward module (images01, prompts) -> (B,) applied to each cell of a grid and averaged."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n

    def forward(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = cell_labels(prompts, self.n)
        return per_cell_mean(self.module(to_cells(images01, self.n), cell_prompts(labels)), self.n)


def grid_accuracy(classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Share of each image's cells that the independent 8x8 classifier reads as their prompted class."""
    hit = classifier(to_cells(images01.float().cpu(), n)).argmax(1) == labels.reshape(-1).cpu()
    return per_cell_mean(hit.float(), n)


def grid_diversity(images01: torch.Tensor, prompts: list[str], n: int) -> float:
    """The 8x8 diversity (mean pairwise L2 between samples of one prompt) of each cell position, averaged over
    the positions: a grid's own L2 would grow like n with the number of cells."""
    from cmalign.training.evaluation import diversity

    cells = to_cells(images01.detach().float().cpu(), n).reshape(len(prompts), n * n, 1, CELL, CELL)
    values = [diversity(cells[:, k], prompts) for k in range(n * n)]
    return float(sum(values) / len(values))


# --- the proxy on cell pairs ------------------------------------------------------------------------
def make_cell_pairs(world, num_pairs: int, num_steps: int = 4, seed: int = 0):
    """num_pairs CELL pairs cut from ceil(num_pairs / n²) pairs of base-model grids of one random prompt each; the
    label of a cell pair ~ Bernoulli(sigmoid(gold_a - gold_b)) of that cell, as in the 8x8 lab. Returns the
    PreferencePairs (8x8 images, class prompts) and the noiseless gold order."""
    from cmalign.chain import generate
    from cmalign.rewards.bradley_terry import PreferencePairs
    from cmalign.worlds.digits.gold import gold_components

    n = world.grid
    gen = torch.Generator().manual_seed(seed)
    grids = math.ceil(num_pairs / (n * n))
    labels = torch.randint(0, NUM_CLASSES, (grids, n * n), generator=gen)
    prompts = [grid_prompt(row.tolist(), n) for row in labels]
    images = generate(world, prompts + prompts, num_steps, gen, reference=True).cpu()
    a, b = to_cells(images[:grids], n)[:num_pairs], to_cells(images[grids:], n)[:num_pairs]
    flat = labels.reshape(-1)[:num_pairs]
    ga, gb = gold_components(a, flat)["gold"], gold_components(b, flat)["gold"]
    prefer_a = torch.bernoulli(torch.sigmoid(ga - gb), generator=gen)
    return PreferencePairs(a, b, cell_prompts(flat), prefer_a), (ga > gb).float()


def build_grid_proxy(world, folder, key: str, num_pairs: int, seed: int, num_steps: int, progress: bool) -> None:
    """Fit and publish the per-cell proxy of a grid base model into `folder` (the 8x8 ProxyCNN; the manifest's
    `grid` makes load_proxy apply it per cell)."""
    from cmalign.worlds.digits.proxy import fit_and_publish

    if progress:
        print(f"cmalign: training the {world.grid}x{world.grid} digits proxy reward on {num_pairs} gold-labelled cell pairs "
              f"-> {folder}", flush=True)
    fit_and_publish(folder, lambda n, s: make_cell_pairs(world, n, num_steps, s), CELL, num_pairs, seed,
                    {"base": key, "num_pairs": num_pairs, "seed": seed, "num_steps": num_steps, "grid": world.grid,
                     "pairs": "cells of grid pairs"})


# --- the world --------------------------------------------------------------------------------------
class GridDigitsWorld(DigitsWorld):
    """The digits world on n x n grids (the same registered world; DigitsWorld dispatches here for digits.grid > 1)."""

    def __init__(self, network, grid: int, device="cpu", **lora):
        super().__init__(network, grid * CELL, device, **lora)
        self.grid = grid

    @classmethod
    def from_pretrained(cls, pretrain, device="cpu", which: str = "consistency", **lora):
        from cmalign.worlds.digits import cache as digits_base

        network, folder, info = digits_base.load_base(pretrain, which)
        world = cls(network, pretrain.grid, device, **lora)
        world.base_folder, world.base_manifest, world.pretrain = folder, info, pretrain
        return world

    def default_prompts(self):
        return default_grid_prompts(self.grid)

    def check_prompts(self, prompts):
        self.encode_prompts(prompts)

    def encode_prompts(self, prompts):
        return cell_labels(prompts, self.grid).to(self.device)

    def step_metrics(self, images01, prompts):
        return {"gold": grid_gold_components(images01, cell_labels(prompts, self.grid), self.grid)["gold"].mean().item()}

    def eval_metrics(self, images01, prompts):
        """The 8x8 world's metrics per cell, averaged over the cells: gold and its terms, accuracy under the
        independent 8x8 classifier, the held-out proxy (per cell like the training proxy)."""
        from cmalign.worlds.digits.classifier import load_classifier

        labels = cell_labels(prompts, self.grid)
        out = grid_gold_components(images01, labels, self.grid)
        with torch.no_grad():
            out["accuracy"] = grid_accuracy(load_classifier(CELL), images01, labels, self.grid)
            judge = self.heldout_proxy()
            if judge is not None:
                out["heldout_proxy"] = judge(images01.float().cpu(), prompts)
        return out
