"""Metrics over generated samples, sample grids, and the evaluation every world shares."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmalign.chain import ChainNoise, run_chain, step_divergences


def image_grid(images01: torch.Tensor, nrow: int, cell: int | None = None) -> Image.Image:
    """Tile (N, C, H, W) images in [0, 1] into a PIL image, nrow images per row (nearest upscaling
    so that 8x8 digits are visible)."""
    x = images01.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    cell = cell or max(h, 64)
    x = torch.nn.functional.interpolate(x, size=(cell, cell), mode="nearest") if cell != h else x
    ncol = nrow
    rows = math.ceil(n / ncol)
    pad = 2
    canvas = torch.full((c, rows * (cell + pad) + pad, ncol * (cell + pad) + pad), 0.5)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[:, pad + r * (cell + pad) : pad + r * (cell + pad) + cell, pad + q * (cell + pad) : pad + q * (cell + pad) + cell] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def _wrapped(text: str, width: int) -> list[str]:
    """text in lines of at most `width` characters (at most 4 lines, the last one cut with ...)."""
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    return lines[:3] + [textwrap.shorten(" ".join(lines[3:]), width, placeholder="...")] if len(lines) > 4 else lines


def labelled_grid(rows: list[tuple[str, torch.Tensor]], title: str = "", label_width: int = 200) -> Image.Image:
    """One row per (label, (N, C, H, W) images in [0, 1]), the label (a prompt, base/tuned) written left of its
    row and the title (step, K) above: a picture that says what it shows."""
    from PIL import ImageDraw

    ncol = max(len(images) for _, images in rows)
    tiles = [image_grid(images, ncol).convert("RGB") for _, images in rows]
    top = 16 if title else 0
    canvas = Image.new("RGB", (label_width + max(t.width for t in tiles), top + sum(t.height for t in tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    y = top
    for (label, _), tile in zip(rows, tiles):
        canvas.paste(tile, (label_width, y))
        draw.multiline_text((4, y + 4), "\n".join(_wrapped(label, label_width // 6 - 1)), fill="black", spacing=2)
        y += tile.height
    return canvas


def save_labelled_grid(rows: list[tuple[str, torch.Tensor]], path: Path, title: str = "") -> Image.Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = labelled_grid(rows, title)
    image.save(path)
    return image


def save_grid(images01: torch.Tensor, path: Path, nrow: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images01, nrow).save(path)


def summarize(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().float().cpu()
    std = v.std().item() if len(v) > 1 else 0.0
    mean, sem = v.mean().item(), std / math.sqrt(max(len(v), 1))
    return {"mean": mean, "std": std, "sem": sem, "n": len(v), "ci95": [mean - 1.96 * sem, mean + 1.96 * sem]}


# The per-chain columns of final_eval_chains.csv: the tuned model's scores, then the base model's on the same chains.
CHAIN_SCORES = ("gold", "accuracy", "reward", "heldout_proxy", "kl_to_base", "distance_to_base")
BASE_CHAIN_SCORES = ("gold", "accuracy", "reward", "heldout_proxy")


def write_chain_scores(path: Path, prompts: list[str], tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """One CSV row per evaluation chain (index, prompt, the tuned scores, `base_`-prefixed base scores; those the
    world gives), 5 significant digits: the data behind intervals that resample chains, not only their means."""
    import csv

    heldout = sorted(k for k in tuned if k.startswith("heldout_") and k not in CHAIN_SCORES)
    columns = [(k, tuned[k]) for k in (*CHAIN_SCORES, *heldout) if k in tuned]
    columns += [(f"base_{k}", base[k]) for k in (*BASE_CHAIN_SCORES, *heldout) if k in base]
    values = [v.detach().float().cpu().tolist() for _, v in columns]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "prompt", *(name for name, _ in columns)])
        for i, prompt in enumerate(prompts):
            out.writerow([i, prompt, *(f"{v[i]:.5g}" for v in values)])


def seeded_noise(seeds: list[int], latent_shape, num_steps: int, device="cpu", dtype=torch.float32) -> ChainNoise:
    """Each chain's noise from its own generator `torch.Generator().manual_seed(seed)`, drawn in the order the
    stock diffusers pipelines draw it (initial latent, then one noise per stochastic step): image i is what
    `pipe(prompt_i, generator=torch.Generator().manual_seed(seeds[i]), num_inference_steps=K)` gives."""
    parts = [ChainNoise.draw(1, latent_shape, num_steps, torch.Generator().manual_seed(int(s)), device, dtype) for s in seeds]
    return ChainNoise(torch.cat([p.initial for p in parts]), [torch.cat([p.steps[k] for p in parts]) for k in range(num_steps - 1)])


@torch.no_grad()
def generate_seeded(world, prompts: list[str], seeds: list[int], num_steps: int, batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1] with the adapter as it is, image i from its own seed (`seeded_noise`)."""
    timesteps, out = world.timesteps(num_steps), []
    for i in range(0, len(prompts), batch_size):
        noise = seeded_noise(seeds[i : i + batch_size], world.latent_shape, num_steps, world.device, world.dtype)
        traj = run_chain(world, world.encode_prompts(prompts[i : i + batch_size]), noise, timesteps)
        out.append(world.decode(traj.x0).float().clamp(0, 1).cpu())
    return torch.cat(out)


def _batch_scores(world, reward, extra_rewards, images, chunk) -> dict[str, torch.Tensor]:
    """The reward (and its components), each held-out reward as `heldout_NAME` (weight times score, never
    summed with anything) and the world's own metrics."""
    scores = {"reward": reward(images, chunk)} if reward is not None else {}
    if reward is not None and len(getattr(reward, "rewards", {})) > 1:
        scores.update({f"reward_{k}": v for k, v in reward.last_components.items()})
    for name, (weight, fn) in (extra_rewards or {}).items():
        scores[f"heldout_{name}"] = weight * fn(images, chunk).detach().float()
    scores.update(world.eval_metrics(images, chunk))
    return scores


@torch.no_grad()
def evaluate(world, reward, prompts: list[str], noise: ChainNoise, num_steps: int, cfg=None,
             use_adapter: bool = True, batch_size: int = 250, against_base: bool = True,
             extra_rewards: dict | None = None, on_batch=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample scores of the chain's samples for fixed prompts and noise: every reward
    component, world metrics and (when cfg is given) the summed divergence to the reference.

    With the adapter on and against_base, two measures of the distance to the base model that are the
    same for every method whatever its own divergence (the gold-vs-divergence plane of the frontier):
    `kl_to_base`, the per-step KL (per_dim, final-step floor) summed over the chain between the tuned and
    the base consistency model on these chains (only for the consistency chain: a DDIM chain (ddpo) is a
    different process, its KL would not be comparable), and `distance_to_base`, the L2 distance in
    [-1, 1] pixel space between the tuned sample and the base model's sample from the same noise.
    extra_rewards: {name: (weight, reward)} scored as `heldout_NAME`; on_batch(n) is called after each batch.
    """
    timesteps = world.timesteps(num_steps)
    scores: dict[str, list[torch.Tensor]] = {}
    images_out = []
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        chunk = prompts[sl]
        part = ChainNoise(noise.initial[sl], [s[sl] for s in noise.steps])
        cond = world.encode_prompts(chunk)
        consistency_chain = getattr(world, "transition", None) is None
        kl_to_base = use_adapter and against_base and consistency_chain
        if use_adapter:
            traj = run_chain(world, cond, part, timesteps, with_reference=cfg is not None or kl_to_base)
        else:
            with world.reference_policy():
                traj = run_chain(world, cond, part, timesteps)
        images = world.decode(traj.x0).float().clamp(0, 1)
        batch_scores = _batch_scores(world, reward, extra_rewards, images, chunk)
        if use_adapter and cfg is not None:
            batch_scores["divergence"] = step_divergences(traj, cfg.divergence, cfg.divergence_reduction, cfg.final_step).sum(1)
        if kl_to_base:
            batch_scores["kl_to_base"] = step_divergences(traj, "kl", "per_dim", "floor").sum(1)
        if use_adapter and against_base:
            with world.reference_policy():
                base = world.decode(run_chain(world, cond, part, timesteps).x0).float().clamp(0, 1)
            batch_scores["distance_to_base"] = ((images - base) * 2).flatten(1).norm(dim=1)
        for k, v in batch_scores.items():
            scores.setdefault(k, []).append(v.detach().float().cpu())
        images_out.append(images.cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return {k: torch.cat(v) for k, v in scores.items()}, torch.cat(images_out)
