"""Data parallelism made visible: which slice of the global batch this rank owns, and the few
collectives the trainer needs (a mean of flat tensors, of metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rank `index` of `count`: every rank draws the GLOBAL batch from one identically seeded generator
    and keeps its own slice, so N ranks of batch b train on exactly the samples one process of
    batch N*b would."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} out of range for {self.count} ranks")

    def take(self, x: torch.Tensor, local: int) -> torch.Tensor:
        """This rank's `local` rows of a global batch of local * count rows."""
        return x[self.index * local:(self.index + 1) * local]


SINGLE = Shard()


def dist_on(num_processes: int) -> bool:
    return num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean_(flat: torch.Tensor, num_processes: int) -> torch.Tensor:
    """In-place mean over ranks of a flat tensor (every rank must call this)."""
    if dist_on(num_processes):
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= num_processes
    return flat


def all_reduce_max(value: float, num_processes: int, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist_on(num_processes):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def gather_metrics(metrics: dict, num_processes: int, device) -> dict:
    """Mean over ranks of every numeric metric (None stays None). Every rank must call this with
    the same keys, which holds because every rank runs the same code path."""
    if not dist_on(num_processes):
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not keys:
        return metrics
    vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean_(vec, num_processes)
    return {**metrics, **{k: v for k, v in zip(keys, vec.tolist())}}


def check_ranks_agree(params: list[torch.Tensor], num_processes: int) -> bool:
    """Every rank must end with the same trainable parameters; raises if they differ."""
    if not dist_on(num_processes):
        return False
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"the trainable parameters differ across ranks (max diff {(hi - lo).abs().max().item():.3g})")
    return True
