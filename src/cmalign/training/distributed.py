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


# --- the end of a multi-rank run ---------------------------------------------------------------------
# Why a rank could die at the very end of a finished run ("terminate called without an active exception",
# SIGABRT, timing-dependent, seen under load): data-parallel LoRA applies DDP in place (`replicate`), and
# DDP's construction keeps references to the gloo process group that nothing releases (measured on torch
# 2.13: the group's Python object gains ~10 references that survive deleting the DDP object, its reducer's
# autograd hooks and the module; destroy_process_group() then leaves the backend's 2 worker threads and
# its transport loop thread running; without DDP it joins them). Those native threads were still alive
# when the interpreter finalised and the C++ runtime ran its exit-time destructors; a thread that wakes
# then (to take the GIL, or on a peer's socket closing) is torn down under them, and the C++ runtime
# aborts. The threads cannot be stopped (gloo has no shutdown; its destructor never runs while the
# references leak), so a process that ran a process group does not finalise: `end_process` flushes
# what Python buffers and ends it with os._exit, which never tears down native threads.
_RAN_PROCESS_GROUP = False


def teardown(num_processes: int) -> None:
    """Every rank meets, then the default process group is destroyed (the end of a finished run)."""
    global _RAN_PROCESS_GROUP
    if not dist_on(num_processes):
        return
    _RAN_PROCESS_GROUP = True
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def end_process(code: int) -> None:
    """The exit of `python -m cmalign`: a process that ran a multi-rank group (finished or not) ends with
    os._exit(code) after flushing stdio and logging, so that no interpreter or C++ teardown runs beside
    the process group's leaked native threads; any other process returns and exits normally."""
    import logging
    import os
    import sys

    ran = _RAN_PROCESS_GROUP or (torch.distributed.is_available() and torch.distributed.is_initialized())
    if not ran:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to write
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
