"""Data-parallel LoRA on 2 CPU ranks (gloo): the trainer's hand-written flat all-reduce against the engines'
reducers, DDP(static_graph=True) and FSDP2 (fully_shard at block level), on the same ROCM step.

    python benchmarks/lora_reducer.py [--steps 10] [--batch 8] [--size base]

One ROCM step of the digits world (K = 4 policy calls + 4 reference calls with the adapter off, KL, a
differentiable stand-in reward, backward, AdamW) per rank, batch per rank as given; the three ways to average
the LoRA gradients. Prints seconds per step (median of the timed steps, max over ranks) and checks the
adapters agree with the hand-written path's. Results: benchmarks/lora_reducer_results.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cmalign.chain import ChainNoise, run_chain, step_divergences  # noqa: E402
from cmalign.training.distributed import Shard  # noqa: E402
from cmalign.worlds.digits.world import DigitsWorld  # noqa: E402
from cmalign.worlds.digits.nets import build_unet  # noqa: E402


def world_for(size: str) -> DigitsWorld:
    torch.manual_seed(0)
    return DigitsWorld(build_unet(size, 8), lora_rank=8, lora_alpha=8.0, lora_init="gaussian")


def rocm_loss(world, step: int, batch: int, shard: Shard) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 10, (batch * shard.count,), generator=gen)
    cond = shard.take(labels, batch)
    noise = ChainNoise.draw(batch, world.latent_shape, 4, gen, shard=shard)
    traj = run_chain(world, cond, noise, world.timesteps(4), with_reference=True)
    reward = world.decode(traj.x0).mean(dim=(1, 2, 3))  # a differentiable stand-in: ink
    return -reward.mean() + 6.0 * step_divergences(traj).sum(1).mean()


def run(mode: str, steps: int, batch: int, size: str) -> tuple[float, torch.Tensor]:
    rank, nproc = dist.get_rank(), dist.get_world_size()
    shard = Shard(rank, nproc)
    world = world_for(size)
    net = world.network
    if mode == "ddp":
        world.network = torch.nn.parallel.DistributedDataParallel(net, static_graph=True)
    elif mode == "replicate":  # DDP applied in place (composable): the world keeps its own module
        from torch.distributed._composable import replicate

        replicate(net, static_graph=True, broadcast_buffers=False)
        if rank == 0:  # a main-process-only forward (evaluation) must not need the other rank
            with torch.no_grad():
                net(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), class_labels=torch.zeros(1, dtype=torch.long))
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in [*net.down_blocks, net.mid_block, *net.up_blocks]:
            fully_shard(block)
        fully_shard(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = rocm_loss(world, step, batch, shard)
        loss.backward()
        if mode == "flat":  # Trainer.optimizer_step: one all-reduce of the flat adapter gradient
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= nproc
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        opt.step()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    full = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in params])
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item(), full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="base")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results, reference = {}, None
    for mode in ("flat", "ddp", "replicate", "fsdp2", "flat"):  # flat twice: the spread between repeats
        try:
            seconds, adapter = run(mode, args.steps, args.batch, args.size)
        except Exception as exc:  # noqa: BLE001 - report an engine that cannot run this step
            results.setdefault(mode, []).append(f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if reference is None:
            reference = adapter
        agree = (adapter - reference).abs().max().item()
        results.setdefault(mode, []).append(f"{seconds:.3f} s/step (adapter max diff to flat {agree:.1e})")
    if dist.get_rank() == 0:
        print(f"2 gloo ranks x batch {args.batch}, digits {args.size} UNet + LoRA r=8, K=4 with reference, "
              f"{args.steps} timed steps, torch {torch.__version__}")
        for mode, lines in results.items():
            print(f"  {mode:6s} " + " | ".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
