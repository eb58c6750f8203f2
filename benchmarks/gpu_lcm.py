"""Seconds per ROCM step and peak CUDA memory of the lcm world at SD-1.5 or SDXL scale.

Random weights with the real SD-1.5 / LCM-Dreamshaper-v7 (512 px) or SDXL base + lcm-sdxl (1024 px,
two text encoders) UNet, VAE and text-encoder configs (no downloads), LoRA r = 8 on the attention
projections, bf16 frozen weights. Each step is the
real thing minus the reward model: run_chain with the reference branch, VAE decode with gradient,
loss = -mean(image) + beta * sum of per-step KL, backward, AdamW. The reward is the image mean so
that the table measures the chain, not a reward network.

    python benchmarks/gpu_lcm.py                 # GPU grid, writes benchmarks/gpu_lcm_results.md
    python benchmarks/gpu_lcm.py --size sdxl     # 1024 px, K 2 4 8, batch 1 4, checkpointing off / unet / unet+vae
                                                 # -> benchmarks/gpu_lcm_sdxl_results.md
    python benchmarks/gpu_lcm.py --tiny          # CPU, tiny configs, seconds (a smoke test; --size tiny-sdxl too)

Checkpointing: "unet" recomputes each network call in the backward pass (run_chain's grad_checkpointing),
"unet+vae" also the VAE decoder's blocks (lcm.vae_checkpointing), "off" neither.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import diffusers
import peft
import torch

from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.worlds.lcm.unet import LCMWorld

# the random-weight components are test fixtures (tests/lcm_fixtures.py), not part of the installed library:
# this benchmark runs from a checkout, beside them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lcm_fixtures import random_components, world_kwargs  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photo of a cat", "a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]


RESOLUTIONS = {"tiny": 32, "tiny-sdxl": 32, "sd15": 512, "sdxl": 1024}
DESCRIPTIONS = {"tiny": "tiny configs, 32 px", "tiny-sdxl": "tiny SDXL-class configs, 32 px",
                "sd15": "SD-1.5 / LCM-Dreamshaper-v7 configs, 512 px",
                "sdxl": "SDXL base + lcm-sdxl configs (two text encoders, 2.6B-parameter UNet), 1024 px"}


def build_world(size: str, device: torch.device, mixed_precision: str, folder: Path) -> LCMWorld:
    components = random_components(folder, size, seed=0, device=device)
    return LCMWorld(**components, **world_kwargs(device=device, resolution=RESOLUTIONS[size], guidance_scale=8.0,
                                                 mixed_precision=mixed_precision, lora_rank=8, lora_alpha=8.0))


def rocm_step(world: LCMWorld, optimizer, batch: int, num_steps: int, divergence_grad: str, checkpointing: bool,
              generator: torch.Generator, beta: float = 1.0) -> float:
    """divergence_grad "bare" is the bare cost of the same work: K policy calls, decode and reward,
    forward and backward, without the reference branch and divergence (ROCM at beta = 0)."""
    prompts = (PROMPTS * batch)[:batch]
    noise = ChainNoise.draw(batch, world.latent_shape, num_steps, generator, world.device, world.dtype)
    bare = divergence_grad == "bare"
    traj = run_chain(world, world.encode_prompts(prompts), noise, world.timesteps(num_steps), with_reference=not bare,
                     divergence_grad="full" if bare else divergence_grad, grad_checkpointing=checkpointing)
    reward = world.decode(traj.x0).mean(dim=(1, 2, 3))
    loss = -reward.mean() if bare else -reward.mean() + beta * step_divergences(traj).sum(1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(world, optimizer, batch, num_steps, divergence_grad, checkpointing, repeats) -> tuple[str, str]:
    """(seconds per step, peak memory) as table cells; "OOM" when CUDA runs out of memory.
    checkpointing: off | unet | unet+vae."""
    cuda = world.device.type == "cuda"
    world.vae.enable_gradient_checkpointing() if checkpointing == "unet+vae" else world.vae.disable_gradient_checkpointing()
    checkpointing = checkpointing != "off"
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        rocm_step(world, optimizer, batch, num_steps, divergence_grad, checkpointing, generator)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            rocm_step(world, optimizer, batch, num_steps, divergence_grad, checkpointing, generator)
        if cuda:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return "OOM", "OOM"
    seconds = (time.perf_counter() - start) / repeats
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a"
    return f"{seconds:.2f}", memory


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test; = --size tiny)")
    parser.add_argument("--size", choices=sorted(RESOLUTIONS), default=None, help="model configs (default sd15)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="sampling steps K (default 1 4 8; sdxl 2 4 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", default=None, choices=["off", "unet", "unet+vae"],
                        help="default: unet off (sd15), unet+vae unet off (sdxl)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per setting after one warm-up")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining settings after this")
    parser.add_argument("--grads", nargs="+", default=None,
                        choices=["bare", "stopgrad_ref", "full"], help="reference branches to time (bare: none)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default beside this script)")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.tiny else "sd15")
    tiny, sdxl = size.startswith("tiny"), size.endswith("sdxl")
    ks = args.ks or ([1, 2] if tiny else [2, 4, 8] if sdxl else [1, 4, 8])
    modes = args.checkpointing or (["unet+vae", "unet", "off"] if sdxl else ["unet", "off"])
    grads = args.grads or (["full"] if sdxl else ["stopgrad_ref", "full"])
    out = args.out or HERE / f"gpu_lcm{'_sdxl' if sdxl and not tiny else ''}_results{'_tiny' if tiny else ''}.md"
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    mixed_precision = "no" if device.type == "cpu" else "bf16"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        world = build_world(size, device, mixed_precision, Path(folder))
    optimizer = torch.optim.AdamW(world.trainable_parameters(), lr=1e-5)
    build_s = time.perf_counter() - started
    lora_params = sum(p.numel() for p in world.trainable_parameters())

    rows = []
    # cheap settings first, so that the time budget cuts the expensive tail
    grid = sorted(itertools.product(ks, args.batches, modes, grads),
                  key=lambda s: (s[0] * s[1], modes.index(s[2])))
    for num_steps, batch, checkpointing, divergence_grad in grid:
        if time.perf_counter() - started > args.budget_s:
            seconds, memory = "skipped (time budget)", ""
        else:
            seconds, memory = measure(world, optimizer, batch, num_steps, divergence_grad, checkpointing, args.repeats)
        rows.append((num_steps, batch, checkpointing, divergence_grad, seconds, memory))
        print(*rows[-1], flush=True)

    bare_s = {r[:3]: float(r[4]) for r in rows if r[3] == "bare" and r[4].replace(".", "", 1).isdigit()}
    ratio = lambda r: f"{float(r[4]) / bare_s[r[:3]]:.2f}" if r[:3] in bare_s and r[4].replace(".", "", 1).isdigit() else ""  # noqa: E731
    rows = [(*r, ratio(r)) for r in rows]
    lines = [
        f"# lcm world: seconds per ROCM step and peak memory ({'tiny, CPU smoke run' if tiny else 'GPU'})",
        "",
        f"- card: {card}; date: {date.today().isoformat()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}",
        f"- model: random weights, {DESCRIPTIONS[size]}; frozen weights {mixed_precision if mixed_precision != 'no' else 'float32'}; "
        f"LoRA r=8 on to_q/to_k/to_v/to_out.0 ({lora_params:,} parameters, float32); AdamW",
        "- step: run_chain with the reference branch, VAE decode with gradient, reward = image mean, "
        "loss = -reward + KL sum, backward, optimiser step",
        f"- {args.repeats} timed steps after one warm-up per setting; world built in {build_s:.1f} s; "
        f"whole run {time.perf_counter() - started:.0f} s",
        "",
        "| K | batch | checkpointing | divergence_grad | s / step | peak CUDA memory (GiB) | × bare |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ] + [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
