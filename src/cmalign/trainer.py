"""The training loop on accelerate: rollout -> objective -> step -> log -> evaluate -> save.

A run directory holds config.yaml, metrics.jsonl (one JSON object per step), tensorboard/,
grids/, the final adapter (adapter/), final_eval.json, curves (PNG), before_after.png, report.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint as ckpt
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


RESUMABLE_CHANGES = ("steps", "max_train_seconds", "eval_every", "grid_every", "final_eval_size", "threads", "device", "output_dir",
                     "checkpoint_every", "keep_checkpoints", "max_bad_steps")


def _config_diff(cfg: TrainConfig, stored_yaml: str, ignore=()) -> list[str]:
    import yaml

    try:
        stored = yaml.safe_load(stored_yaml) or {}
    except yaml.YAMLError:
        return ["config.yaml (unreadable)"]
    now = dataclasses.asdict(cfg)
    return sorted(k for k in set(now) | set(stored) if k not in ignore and now.get(k) != stored.get(k))


def resolve_run_dir(cfg: TrainConfig, overwrite: bool = False, resume: str | None = None) -> Path:
    """The run directory; one that already holds a run is refused unless overwrite is asked for.
    With resume, the run directory must hold a run of the same config (steps and logging may change)."""
    if resume is not None:
        if overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if resume != "latest":
            ckpt.find_checkpoint(resume, Path("."))  # refuse a path that is not a checkpoint first
            if cfg.output_dir is None:
                cfg.output_dir = str(Path(resume).parent.parent)  # runs/X/checkpoints/step_N -> runs/X
        if cfg.output_dir is None:
            raise UserError("--resume latest needs --output-dir (the run directory to resume)")
        run_dir = Path(cfg.output_dir)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} holds no run (no config.yaml)")
        diff = _config_diff(cfg, (run_dir / "config.yaml").read_text(), ignore=RESUMABLE_CHANGES)
        if diff:
            raise UserError(f"--resume: {run_dir} holds a run with a different config ({', '.join(diff[:6])}); "
                            "resume with the same settings, or start a new output_dir")
        return run_dir
    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = str(Path("runs") / f"{cfg.method}-{cfg.world}-{stamp}")
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if (run_dir / "config.yaml").exists() and not overwrite:
        diff = _config_diff(cfg, (run_dir / "config.yaml").read_text(errors="replace"), ignore=("output_dir",))
        what = f" with a different config ({', '.join(diff[:6])})" if diff else ""
        raise UserError(f"{run_dir} already holds a run{what}; choose another output_dir, pass --resume latest "
                        "to continue it, or --overwrite to replace it")
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
    def __init__(self, cfg: TrainConfig, overwrite: bool = False, progress: bool = True, resume: str | None = None):
        self.cfg = validate(cfg)
        self.resume = resume
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = Accelerator(cpu=device_of(cfg) == "cpu")
        self.run_dir = resolve_run_dir(cfg, overwrite, resume)
        self.resume_from = ckpt.find_checkpoint(resume, self.run_dir) if resume is not None else None
        self.resume_state = ckpt.read_checkpoint(self.resume_from) if self.resume_from is not None else None
        self.main = self.accelerator.is_main_process
        if cfg.prompt_file:
            read_prompt_file(cfg.prompt_file)  # fail on a bad file before any expensive set-up
        if cfg.world == "digits":
            # Build a missing base-model cache (which draws random numbers) BEFORE seeding, so that
            # the adapter's initialisation does not depend on whether the cache already existed.
            from .worlds import digits_base, digits_pretrain_config

            digits_base.locate(digits_pretrain_config(cfg), True, progress)
        torch.manual_seed(cfg.seed)
        self.world = build_world(cfg, self.accelerator.device)
        ctx = reward_context(self.world, cfg, self.accelerator.device)
        self.reward = build_weighted(cfg.reward_weights, ctx)
        self.method = build_method(cfg, self.world, self.reward)
        self.train_prompts, self.eval_prompts = training_prompts(cfg, self.world)
        params = self.world.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The network is NOT wrapped in DDP: methods call it many times per backward (policy and
        # reference, adapters toggled), which DDP's reducer handles badly. Gradients are averaged
        # over ranks by hand in optimizer_step instead (one all-reduce of the flat LoRA gradient).
        self.optimizer = self.accelerator.prepare(optimizer)
        self.params = params
        self.ema = ckpt.EMA(params, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0
        self.train_seconds = 0.0
        self.bad_steps = 0  # updates skipped for non-finite values, in all
        self.bad_in_a_row = 0
        self._step_bad = False

    # --- pieces of the loop ---------------------------------------------------------------------
    def _noise(self, n: int, generator: torch.Generator) -> ChainNoise:
        return ChainNoise.draw(n, self.world.latent_shape, self.cfg.num_steps, generator, self.world.device, self.world.dtype)

    def _eval_set(self, size: int, offset: int):
        prompts = eval_prompt_set(self.eval_prompts, size)
        gen = torch.Generator().manual_seed(self.cfg.seed + offset)
        return prompts, self._noise(len(prompts), gen)

    def _ema_applied(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate_fixed(self) -> dict:
        with self._ema_applied():
            return self._evaluate_fixed()

    def _evaluate_fixed(self) -> dict:
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
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, row["step"])

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """One update of the adapter from `loss`; returns the gradient norm before clipping.
        Methods call it once per step (ROCM) or once per minibatch (policy gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        params = self.params
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        if not local_bad:
            self.accelerator.backward(loss)
        # Every rank reaches this all-reduce (also after a non-finite loss): the flat gradient plus a
        # bad-flag, so that all ranks take the same skip-or-step decision.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in params] + [torch.tensor([float(local_bad)], device=params[0].device)])
        ckpt.all_reduce_mean_(flat, self.accelerator.num_processes)
        bad = bool(flat[-1] > 0) or not bool(torch.isfinite(flat).all())
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._step_bad = True
            return float("nan")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        grad_norm = torch.norm(flat[:-1])
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        return float(grad_norm)

    # --- the run ---------------------------------------------------------------------------------
    def train(self) -> Path:
        cfg = self.cfg
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        # One generator seeded identically on every rank: each step draws the GLOBAL batch of
        # prompts and chain noise and every rank takes its own slice (ckpt.sharded_noise), so N
        # processes of batch b train on exactly the samples one process of batch N*b would.
        gen = torch.Generator().manual_seed(cfg.seed * 1000)
        start_step = 0
        if self.resume_state is not None:
            tensors, meta = self.resume_state
            ckpt.restore(tensors, meta, self.params, self.optimizer, self.ema, gen)
            start_step = self.step = int(meta["step"])
            self.train_seconds = float(meta["train_seconds"])
            self.bad_steps = int(meta.get("bad_steps", 0))
            self.bad_in_a_row = int(meta.get("bad_in_a_row", 0))
            self.resume_state = None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if start_step == 0 and self.resume_from is None:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            else:
                ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            # the whole configuration on screen for an interactive run; experiments' runs (progress off) name the file
            print(f"cmalign: resolved config -> {self.run_dir / 'config.yaml'}" + (f"\n{to_yaml(cfg)}" if self.progress else ""), flush=True)
            print(f"cmalign: {nproc} process(es) x batch {cfg.batch_size} per process = global batch "
                  f"{nproc * cfg.batch_size}; {cfg.steps} steps = {cfg.steps * nproc * cfg.batch_size} samples"
                  + (f"; resuming from {self.resume_from} (step {start_step})" if self.resume_from else ""), flush=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.eval_set = self._eval_set(cfg.eval_size, EVAL_SEED_OFFSET)
        if start_step == 0 and self.main:
            row = {"step": 0, **self.evaluate_fixed()}
            self.grid(self.last_eval_images, "step_000000.png")
            self.base_eval_images = self.last_eval_images
            self.log(row)
        bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=f"{cfg.method} {cfg.world}",
                   disable=not (self.progress and self.main))
        for step in bar:
            self.step = step
            self._step_bad = False
            start = time.perf_counter()
            idx = torch.randint(0, len(self.train_prompts), (cfg.batch_size * nproc,), generator=gen)
            idx = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            prompts = [self.train_prompts[i] for i in idx.tolist()]
            if hasattr(self.method, "batch_prompts"):  # pairwise methods (d3po) draw each prompt twice
                prompts = self.method.batch_prompts(prompts)
            with ckpt.sharded_noise(rank, nproc):
                metrics, images = self.method.step(prompts, gen, self.optimizer_step)
            if self._step_bad:
                self.bad_steps += 1
                self.bad_in_a_row += 1
            else:
                self.bad_in_a_row = 0
                if self.ema is not None:
                    self.ema.update()
            self.train_seconds += time.perf_counter() - start
            row = {"step": step, **metrics, "wall_time": round(self.train_seconds, 3),
                   "samples": step * cfg.batch_size * nproc}
            if self.world.name == "digits":
                from .rewards.digits_gold import gold_score

                row["gold"] = gold_score(images, prompts).mean().item()
            row = ckpt.gather_metrics(row, nproc, self.accelerator.device)
            row["step"], row["samples"] = step, step * cfg.batch_size * nproc
            row["skipped"] = self._step_bad
            row["bad_steps"] = self.bad_steps
            last = step == cfg.steps or self._time_up()
            if self.bad_in_a_row >= cfg.max_bad_steps:
                self.log(row)
                bar.close()
                last = ckpt.list_checkpoints(self.run_dir / "checkpoints")
                where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                raise UserError(f"stopping at step {step}: {self.bad_in_a_row} updates in a row were skipped for "
                                f"non-finite reward, loss or gradients (max_bad_steps={cfg.max_bad_steps}); {where}")
            if self.main:
                if step % cfg.eval_every == 0 or last:
                    row.update(self.evaluate_fixed())
                    bar.set_postfix({k: f"{row[k]:.2f}" for k in ("eval_reward", "eval_gold") if k in row})
                if step % cfg.grid_every == 0 or last:
                    if step % cfg.eval_every and not last:
                        self.evaluate_fixed()
                    self.grid(self.last_eval_images, f"step_{step:06d}.png")
                self.log(row)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not self._step_bad:
                    self.save_checkpoint(gen)
            if last:
                if step < cfg.steps and self.main:  # stopped by the time budget: a checkpoint to resume from
                    if cfg.checkpoint_every and not self._step_bad and step % cfg.checkpoint_every:
                        self.save_checkpoint(gen)
                    print(f"cmalign: stopping at step {step}: {self.train_seconds:.1f} train seconds reached "
                          f"max_train_seconds={cfg.max_train_seconds:g}", flush=True)
                break
        self.accelerator.wait_for_everyone()  # reached by every rank
        self._check_ranks_agree()
        if ckpt.dist_on(self.accelerator.num_processes):
            # Every rank leaves the process group together; a rank exiting while the main process
            # still writes its report would otherwise abort gloo ("terminate called ...").
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return self.finish()

    def _time_up(self) -> bool:
        """The train-seconds budget is spent (on any rank: every rank stops at the same step)."""
        if self.cfg.max_train_seconds is None:
            return False
        spent = torch.tensor([self.train_seconds], device=self.accelerator.device)
        if ckpt.dist_on(self.accelerator.num_processes):
            torch.distributed.all_reduce(spent, op=torch.distributed.ReduceOp.MAX)
        return spent.item() >= self.cfg.max_train_seconds

    def _check_ranks_agree(self) -> None:
        """Every rank must end with the same adapter (gradients are averaged by hand)."""
        nproc = self.accelerator.num_processes
        if not ckpt.dist_on(nproc):
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
        hi, lo = flat.clone(), flat.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise RuntimeError(f"the adapter differs across ranks (max diff {(hi - lo).abs().max().item():.3g})")
        if self.main:
            print(f"cmalign: adapter parameters identical across {nproc} ranks", flush=True)

    def save_checkpoint(self, gen: torch.Generator) -> Path:
        """checkpoints/step_XXXXXX (main process only; no collectives)."""
        scalars = {"train_seconds": self.train_seconds, "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row,
                   "data_position": {"generator": "rng.generator", "step": self.step}}
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.world, self.params, self.optimizer,
                                    self.ema, gen, scalars, self.cfg.keep_checkpoints)

    def finish(self) -> Path:
        cfg = self.cfg
        if not self.main:
            return self.run_dir
        self.tb.close()
        adapter_dir = self.run_dir / "adapter"
        adapter_dir.mkdir(exist_ok=True)
        if self.ema is not None:  # the EMA is the final adapter (and what the final evaluation scores)
            self._ema_ctx = self.ema.applied()
            self._ema_ctx.__enter__()
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
                  f"{self.step} steps x batch {cfg.batch_size}, {self.train_seconds:.0f} s of training."
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


def train(cfg: TrainConfig, overwrite: bool = False, progress: bool = True, resume: str | None = None) -> Path:
    return Trainer(cfg, overwrite=overwrite, progress=progress, resume=resume).train()
