"""The training loop on accelerate: rollout -> objective -> step -> log -> evaluate -> save.

A run directory holds config.yaml, metrics.jsonl (one JSON object per step), tensorboard/,
grids/, the final adapter (adapter/), final_eval.json, curves (PNG), before_after.png, report.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import report
from .chain import ChainNoise
from .config import TrainConfig, to_yaml, validate
from .errors import UserError
from .evaluation import evaluate, save_grid, summarize, diversity
from .methods import build_method
from .prompts import read_prompt_file, training_prompts
from .rewards import build_weighted, reward_context
from .worlds import build_world

EVAL_SEED_OFFSET = 10_000  # the fixed evaluation noise
FINAL_SEED_OFFSET = 20_000  # fresh held-out noise for the final base-vs-tuned comparison


def resolve_run_dir(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """The run directory; one that already holds a run is refused unless overwrite is asked for."""
    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = str(Path("runs") / f"{cfg.method}-{cfg.world}-{stamp}")
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise UserError(f"{run_dir} already holds a run; choose another output_dir or pass --overwrite")
    return run_dir


def eval_prompt_set(prompts: list[str], size: int) -> list[str]:
    """`size` prompts, each distinct prompt repeated in a block (a grid row per prompt)."""
    per = math.ceil(size / len(prompts))
    return [p for p in prompts for _ in range(per)][:size]


def device_of(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA device")
    return cfg.device


class Trainer:
    def __init__(self, cfg: TrainConfig, overwrite: bool = False, progress: bool = True):
        self.cfg = validate(cfg)
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = Accelerator(cpu=device_of(cfg) == "cpu")
        self.run_dir = resolve_run_dir(cfg, overwrite)
        self.main = self.accelerator.is_main_process
        if cfg.prompt_file:
            read_prompt_file(cfg.prompt_file)  # fail on a bad file before any expensive set-up
        torch.manual_seed(cfg.seed)
        self.world = build_world(cfg, self.accelerator.device)
        ctx = reward_context(self.world, cfg, self.accelerator.device)
        if any(n == "gold" for n in cfg.reward_weights):
            raise UserError("gold is the evaluation stand-in for human raters and never a training reward; train on proxy")
        self.reward = build_weighted(cfg.reward_weights, ctx)
        self.method = build_method(cfg, self.world, self.reward)
        self.train_prompts, self.eval_prompts = training_prompts(cfg, self.world)
        params = self.world.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.world.network, self.optimizer = self.accelerator.prepare(self.world.network, self.optimizer)
        self.step = 0
        self.train_seconds = 0.0

    # --- pieces of the loop ---------------------------------------------------------------------
    def _noise(self, n: int, generator: torch.Generator) -> ChainNoise:
        return ChainNoise.draw(n, self.world.latent_shape, self.cfg.num_steps, generator, self.world.device, self.world.dtype)

    def _eval_set(self, size: int, offset: int):
        prompts = eval_prompt_set(self.eval_prompts, size)
        gen = torch.Generator().manual_seed(self.cfg.seed + offset)
        return prompts, self._noise(len(prompts), gen)

    def evaluate_fixed(self) -> dict:
        scores, images = evaluate(self.world, self.reward, self.eval_set[0], self.eval_set[1], self.cfg.num_steps, self.cfg)
        self.last_eval_images = images
        return {f"eval_{k}": v.mean().item() for k, v in scores.items()}

    def grid(self, images: torch.Tensor, name: str) -> None:
        per = math.ceil(len(self.eval_set[0]) / len(self.eval_prompts))
        ncol = min(per, 8)
        rows = [images[i * per : i * per + ncol] for i in range(min(len(self.eval_prompts), 10))]
        save_grid(torch.cat(rows), self.run_dir / "grids" / name, nrow=ncol)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, row["step"])

    # --- the run ---------------------------------------------------------------------------------
    def train(self) -> Path:
        cfg = self.cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            print(f"cmalign: resolved config ->{self.run_dir / 'config.yaml'}\n{to_yaml(cfg)}", flush=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.eval_set = self._eval_set(cfg.eval_size, EVAL_SEED_OFFSET)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.accelerator.process_index)
        row = {"step": 0, **self.evaluate_fixed()}
        self.grid(self.last_eval_images, "step_000000.png")
        self.base_eval_images = self.last_eval_images
        self.log(row)
        bar = tqdm(range(1, cfg.steps + 1), desc=f"{cfg.method} {cfg.world}", disable=not (self.progress and self.main))
        for step in bar:
            self.step = step
            start = time.perf_counter()
            idx = torch.randint(0, len(self.train_prompts), (cfg.batch_size,), generator=gen)
            prompts = [self.train_prompts[i] for i in idx.tolist()]
            loss, metrics, images = self.method.loss(prompts, self._noise(cfg.batch_size, gen), gen)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            params = self.world.trainable_parameters()
            if cfg.grad_clip > 0:
                grad_norm = self.accelerator.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            self.optimizer.step()
            self.train_seconds += time.perf_counter() - start
            row = {"step": step, **metrics, "grad_norm": float(grad_norm), "wall_time": round(self.train_seconds, 3),
                   "samples": step * cfg.batch_size * self.accelerator.num_processes}
            if self.world.name == "digits":
                from .rewards.digits_gold import gold_score

                row["gold"] = gold_score(images, prompts).mean().item()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row.update(self.evaluate_fixed())
                bar.set_postfix({k: f"{row[k]:.2f}" for k in ("eval_reward", "eval_gold") if k in row})
            if step % cfg.grid_every == 0 or step == cfg.steps:
                if step % cfg.eval_every and step != cfg.steps:
                    self.evaluate_fixed()
                self.grid(self.last_eval_images, f"step_{step:06d}.png")
            self.log(row)
        return self.finish()

    def finish(self) -> Path:
        cfg = self.cfg
        if not self.main:
            return self.run_dir
        self.tb.close()
        adapter_dir = self.run_dir / "adapter"
        adapter_dir.mkdir(exist_ok=True)
        self.world.save_adapter(adapter_dir)
        # Base vs tuned on fresh held-out noise: the same prompts and noise for both.
        final = {"n": cfg.final_eval_size}
        if cfg.final_eval_size > 0:
            prompts, noise = self._eval_set(cfg.final_eval_size, FINAL_SEED_OFFSET)
            for label, use_adapter in (("base", False), ("tuned", True)):
                scores, images = evaluate(self.world, self.reward, prompts, noise, cfg.num_steps, use_adapter=use_adapter)
                final[label] = {k: summarize(v) for k, v in scores.items()}
                final[label]["diversity"] = diversity(images, prompts)
                final[f"_{label}_images"] = images
            (self.run_dir / "final_eval.json").write_text(json.dumps({k: v for k, v in final.items() if not k.startswith("_")}, indent=2))
            self._before_after(final.pop("_base_images"), final.pop("_tuned_images"), prompts)
        report.plot_curves(self.run_dir)
        summary = f"`{cfg.method}` on `{cfg.world}`: K={cfg.num_steps}, beta={cfg.beta} ({cfg.divergence}), lr={cfg.lr}, " \
                  f"{cfg.steps} steps x batch {cfg.batch_size}, {self.train_seconds:.0f} s of training."
        if cfg.final_eval_size > 0:
            report.write_report(self.run_dir, summary, final)
        return self.run_dir

    def _before_after(self, base: torch.Tensor, tuned: torch.Tensor, prompts: list[str]) -> None:
        """Rows alternate base / tuned for each prompt (same noise), up to 8 samples each."""
        distinct = list(dict.fromkeys(prompts))[:10]
        ncol = min(8, min(prompts.count(p) for p in distinct))
        rows = []
        for p in distinct:
            idx = [i for i, q in enumerate(prompts) if q == p][:ncol]
            rows += [base[idx], tuned[idx]]
        if rows:
            save_grid(torch.cat(rows), self.run_dir / "before_after.png", nrow=ncol)


def train(cfg: TrainConfig, overwrite: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, overwrite=overwrite, progress=progress).train()
