"""Pretraining of the digits world's base models (`cmalign pretrain digits`).

Recipe (research/feasibility.md, recipe b): a class-conditional v-prediction DDPM teacher on a
cosine schedule, then LCM-style consistency distillation (LCD) of a student that starts as the
teacher's EMA: DDIM solver over 50 skipping timesteps, classifier-free guided teacher, EMA
target network, pseudo-Huber loss, LCM boundary conditions. The teacher is kept: the DDPO
baseline fine-tunes it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from cmalign import schedule
from cmalign.errors import UserError
from cmalign.worlds.digits.cells import CELL, grid_batches
from cmalign.worlds.digits.data import NULL_CLASS, digits_dataset
from cmalign.worlds.digits.nets import GridUNet, build_unet

BETA_SCHEDULE = "squaredcos_cap_v2"
PREDICTION_TYPE = "v_prediction"
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class PretrainConfig:
    resolution: int = 8
    """Image side in pixels (the 8x8 digits are upsampled bilinearly for 16)."""
    model_size: str = "base"
    """UNet width: base (1.1M parameters) or tiny (tests)."""
    teacher_steps: int = 2600
    """DDPM teacher updates at batch_size (about 5 min on 2 cores at 8x8)."""
    distill_steps: int = 950
    """Consistency-distillation updates (about 4 min on 2 cores at 8x8)."""
    batch_size: int = 128
    """Images per update for both stages."""
    teacher_lr: float = 1e-3
    """Adam learning rate of the teacher."""
    distill_lr: float = 3e-4
    """Adam learning rate of the consistency student."""
    class_dropout: float = 0.1
    """Probability of the null class while training the teacher (enables guidance)."""
    teacher_ema: float = 0.999
    """EMA decay of the teacher weights that are kept."""
    target_ema: float = 0.95
    """EMA decay of the LCD target network."""
    distill_guidance: float = 2.0
    """Classifier-free guidance scale of the teacher inside the distillation targets (1 = none)."""
    ddim_skip: int = 20
    """Solver stride in training timesteps (LCM's 50 skipping steps)."""
    huber_c: float = 1e-3
    """Pseudo-Huber constant of the distillation loss."""
    seed: int = 0
    """Seed of initialisation, batches and noise."""
    grid: int = 1
    """Compositional digits: an N x N grid of 8x8 digits per image (worlds/digits/grid.py); 1 is the plain digit."""


# Pretraining recipes of the shipped grid base models: images per update chosen so that an update sees
# about the 8x8 recipe's 128 digits (32 x 4, 14 x 9, 8 x 16); step counts fitted to ~15 min on 2 cores.
GRID_RECIPES = {
    2: dict(batch_size=32, teacher_steps=1400, distill_steps=400),
    3: dict(batch_size=14, teacher_steps=1400, distill_steps=400),
    4: dict(batch_size=8, teacher_steps=1400, distill_steps=400),
}


def grid_pretrain_config(n: int, model_size: str = "base", **overrides) -> PretrainConfig:
    """The PretrainConfig of the n x n grid's base models (GRID_RECIPES[n], then overrides such as step counts)."""
    if n not in GRID_RECIPES:
        raise UserError(f"digits grid must be 2, 3 or 4 for a grid recipe, got {n}")
    return PretrainConfig(resolution=CELL, model_size=model_size, grid=n, **{**GRID_RECIPES[n], **overrides})


def step_overrides(digits) -> dict[str, int]:
    """The step counts a config's digits section overrides (pretrain_teacher_steps, pretrain_distill_steps)."""
    steps = {"teacher_steps": digits.pretrain_teacher_steps, "distill_steps": digits.pretrain_distill_steps}
    return {k: v for k, v in steps.items() if v is not None}


# A recipe names its data and network: the plain digits (at cfg.resolution) or N x N compositions of 8x8 cells.
def training_batches(cfg: PretrainConfig, gen: torch.Generator):
    """Endless training batches: the plain digits, or N x N compositions (labels (B, N²)) for cfg.grid > 1."""
    if cfg.grid > 1:
        return grid_batches(cfg.grid, cfg.batch_size, gen)
    x, y = digits_dataset(cfg.resolution)
    return _batches(x, y, cfg.batch_size, gen)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    while True:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        yield x[idx], y[idx]


def build_network(cfg: PretrainConfig) -> torch.nn.Module:
    """The untrained network of this recipe (the grid's per-cell conditioned UNet for cfg.grid > 1)."""
    if cfg.grid > 1:
        return GridUNet(cfg.grid, cfg.model_size)
    return build_unet(cfg.model_size, cfg.resolution)


@torch.enable_grad()
def train_teacher(cfg: PretrainConfig, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    abar = schedule.alphas_cumprod(BETA_SCHEDULE, num_train_timesteps=NUM_TRAIN_TIMESTEPS).float()
    net, batches = build_network(cfg), training_batches(cfg, gen)
    ema = EMAModel(net.parameters(), decay=cfg.teacher_ema)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.99))
    start, losses = time.time(), []
    for _ in tqdm(range(cfg.teacher_steps), desc="pretrain: DDPM teacher", disable=not progress):
        x0, y = next(batches)
        drop = torch.rand(len(y), generator=gen) < cfg.class_dropout  # per image: a grid's cells all go null at once
        y = torch.where(drop.view(-1, *[1] * (y.dim() - 1)), torch.full_like(y, NULL_CLASS), y)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, noise, abar[t])
        loss = F.mse_loss(net(x_t, t, class_labels=y).sample, schedule.v_target(x0, noise, abar[t]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(net.parameters())
        losses.append(loss.item())
    ema.copy_to(net.parameters())
    stats = {"teacher_seconds": round(time.time() - start, 1), "teacher_final_loss": sum(losses[-100:]) / min(100, len(losses))}
    return net.eval().requires_grad_(False), stats


def guided_prediction(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), one batched forward."""
    if scale == 1.0:
        return net(x, t, class_labels=y).sample
    out = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, NULL_CLASS)])).sample
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.enable_grad()
def distill_consistency(cfg: PretrainConfig, teacher: torch.nn.Module, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    abar = schedule.alphas_cumprod(BETA_SCHEDULE, num_train_timesteps=NUM_TRAIN_TIMESTEPS).float()
    solver_ts = torch.arange(1, NUM_TRAIN_TIMESTEPS // cfg.ddim_skip + 1) * cfg.ddim_skip - 1  # 19, 39, ..., 999
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.distill_lr)
    batches = training_batches(cfg, gen)

    def f(net, x, t, y):
        out = net(x, t, class_labels=y).sample
        a = abar[t].view(-1, 1, 1, 1)
        c_skip, c_out = (c.float().view(-1, 1, 1, 1) for c in schedule.boundary_scalings(t))
        return c_skip * x + c_out * schedule.predicted_x0(x, out, a, PREDICTION_TYPE)

    start, losses = time.time(), []
    for _ in tqdm(range(cfg.distill_steps), desc="pretrain: consistency distillation", disable=not progress):
        x0, y = next(batches)
        t = solver_ts[torch.randint(0, len(solver_ts), (len(x0),), generator=gen)]
        t_prev = (t - cfg.ddim_skip).clamp_min(0)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, noise, abar[t])
        with torch.no_grad():
            v = guided_prediction(teacher, x_t, t, y, cfg.distill_guidance)
            a_t, a_prev = abar[t].view(-1, 1, 1, 1), abar[t_prev].view(-1, 1, 1, 1)
            x0_hat = a_t.sqrt() * x_t - (1 - a_t).sqrt() * v
            eps_hat = a_t.sqrt() * v + (1 - a_t).sqrt() * x_t
            x_prev = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat  # one DDIM step of the teacher
            goal = f(target, x_prev, t_prev, y)
        pred = f(student, x_t, t, y)
        loss = (torch.sqrt((pred - goal) ** 2 + cfg.huber_c**2) - cfg.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_t, p_s in zip(target.parameters(), student.parameters()):
                p_t.lerp_(p_s, 1 - cfg.target_ema)
        losses.append(loss.item())
    stats = {"distill_seconds": round(time.time() - start, 1), "distill_final_loss": sum(losses[-100:]) / min(100, len(losses))}
    return student.eval().requires_grad_(False), stats


def pretrain(cfg: PretrainConfig, progress: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Train the teacher and distil the consistency model; returns (teacher, consistency, stats)."""
    teacher, stats = train_teacher(cfg, progress)
    consistency, more = distill_consistency(cfg, teacher, progress)
    return teacher, consistency, {**stats, **more, "config": asdict(cfg)}
