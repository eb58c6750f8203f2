"""The training loop on accelerate: restore -> draw batch -> step -> log/evaluate -> checkpoint -> stop.

The trainer names no world and no method: it drives a `World`, a `Method` and a reward found through
their registries (or handed in ready-made through `train(config, world=..., reward=..., method=...)`).
A run directory holds config.yaml, metrics.jsonl (one JSON object per step), tensorboard/, grids/,
the final adapter (adapter/), final_eval.json, curves (PNG), before_after.png, report.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from cmalign import export as exporting
from cmalign.training import checkpoint as ckpt
from cmalign.training import cost
from cmalign.training import full_finetune as finetune
from cmalign.training import distributed as dist
from cmalign.training import report
from cmalign.training import tracking
from cmalign.training.run_dir import Preempted, RunLock, StopSignals, atomic_dir, clear_run_artefacts, writing
from cmalign.chain import ChainNoise
from cmalign.config import TrainConfig, config_diff, flat_items, to_dict, to_yaml, validate, with_changes
from cmalign.config.checks import check_types
from cmalign.training.distributed import Shard
from cmalign.errors import UserError
from cmalign.training.evaluation import evaluate, save_labelled_grid, summarize, write_chain_scores
from cmalign.methods.base import Batch, Method
from cmalign.methods.registry import method_class
from cmalign.prompts import load_prompts, prompt_split
from cmalign.plugins import as_plugin_error, plugin_module
from cmalign.rewards.registry import as_training_reward, build_reward, build_weighted, reward_context, reward_label, reward_plugins
from cmalign.worlds.base import World
from cmalign.worlds.registry import world_class

EVAL_SEED_OFFSET = 10_000  # the fixed evaluation noise
FINAL_SEED_OFFSET = 20_000  # fresh held-out noise for the final base-vs-tuned comparison

RESUMABLE_CHANGES = ("steps", "max_train_seconds", "eval_every", "grid_every", "final_eval_size", "threads", "device", "output_dir",
                     "checkpoint_every", "keep_checkpoints", "max_bad_steps", "report_to")


@dataclass
class TrainResult:
    """What a finished run gives its caller (the run directory holds the same on disk)."""

    run_dir: Path
    config: TrainConfig
    metrics: list[dict]  # the rows of metrics.jsonl
    final_eval: dict  # final_eval.json: base vs tuned on held-out noise ({} when final_eval_size is 0)
    eval_prompts: list[str]  # prompts of the fixed evaluation chains
    base_eval_images: torch.Tensor | None  # the fixed evaluation chains at step 0 (None when resumed)
    last_eval_images: torch.Tensor | None  # ... and at the last evaluation
    world: World = field(repr=False)  # holds the tuned adapter
    reward: Any = field(repr=False)

    # a result stands for its run directory where a path is expected: os.fspath(result), result / "report.md"
    def __fspath__(self) -> str:
        return str(self.run_dir)

    def __truediv__(self, other) -> Path:
        return self.run_dir / other


def resolve_run_dir(cfg: TrainConfig, overwrite: bool = False, resume: str | None = None) -> Path:
    """The run directory; one that already holds a run is refused unless overwrite is asked for.
    With resume, the run directory must hold a run of the same config (steps and logging may change)."""
    if resume is not None:
        if overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        output_dir = cfg.output_dir
        if resume != "latest":
            ckpt.find_checkpoint(resume, Path("."))  # refuse a path that is not a checkpoint first
            output_dir = output_dir or str(Path(resume).parent.parent)  # runs/X/checkpoints/step_N -> runs/X
        if output_dir is None:
            raise UserError("--resume latest needs --output-dir (the run directory to resume)")
        run_dir = Path(output_dir)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} holds no run (no config.yaml)")
        diff = config_diff(cfg, (run_dir / "config.yaml").read_text(errors="replace"), ignore=RESUMABLE_CHANGES)
        if diff:
            raise UserError(f"--resume: {run_dir} holds a run with a different config ({', '.join(diff[:6])}); "
                            "resume with the same settings, or start a new output_dir")
        return run_dir
    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{cfg.method}-{cfg.world}-{stamp}"
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if (run_dir / "config.yaml").exists() and not overwrite:
        diff = config_diff(cfg, (run_dir / "config.yaml").read_text(errors="replace"), ignore=("output_dir",))
        if not diff and not started(run_dir):
            return run_dir  # killed before its first checkpoint: the same command starts it again
        what = f" with a different config ({', '.join(diff[:6])})" if diff else ""
        raise UserError(f"{run_dir} already holds a run{what}; choose another output_dir, pass --resume latest "
                        "to continue it, or --overwrite to replace it")
    return run_dir


def started(run_dir: Path) -> bool:
    """A run that holds a checkpoint or its final adapter has something to keep; one killed before
    both (config.yaml and the first steps' metrics only) is started again from step 0."""
    return bool(ckpt.list_checkpoints(run_dir / "checkpoints")) or (run_dir / "adapter").exists()


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
    def __init__(self, cfg: TrainConfig, **kwargs):
        self.lock, self.plugins = None, {}
        try:
            self._init(cfg, **kwargs)
        except BaseException as exc:  # a failed set-up gives the run directory back at once
            if self.lock is not None:
                self.lock.release(discard=True)  # a run dir this attempt created goes with it
            error = as_plugin_error(exc, self.plugins, "during the set-up (before step 1)")
            if error is not None:
                raise error from exc
            raise

    def _init(self, cfg: TrainConfig, *, world: World | None = None, reward=None, method=None,
              overwrite: bool = False, progress: bool = True, resume: str | None = None, dry_run: bool = False):
        check_types(cfg)  # before any name is looked up: world=None, method=7
        world_cls = type(world) if world is not None else world_class(cfg.world)
        method_cls = _method_class_of(method) if method is not None else method_class(cfg.method)
        self.plugins = plugin_labels(cfg, world_cls, method_cls, reward)
        validate(cfg, world_cls=world_cls, method_cls=method_cls, check_rewards=reward is None)
        self.progress, self.resume = progress, resume
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if reward is not None:  # the run's record names the reward it trains on, not the config's unused reward_weights
            cfg = with_changes(cfg, reward_weights={reward_label(reward): 1.0})
        run_dir = resolve_run_dir(cfg, overwrite, resume)
        self.cfg = cfg = with_changes(cfg, output_dir=str(run_dir))  # a copy: the caller's config is not changed
        self.run_dir = run_dir
        trackers = None if dry_run else tracking.trackers(cfg.report_to) or None
        self.accelerator = Accelerator(cpu=device_of(cfg) == "cpu", log_with=trackers,
                                       project_config=ProjectConfiguration(str(run_dir), str(run_dir / "tensorboard")))
        self.main = self.accelerator.is_main_process
        self.shard = Shard(self.accelerator.process_index, self.accelerator.num_processes)
        if dry_run:  # --dry-run (cost.dry_run): no run directory, no lock, nothing to resume
            self.restarted, self.resume_from, self.resume_state = False, None, None
        else:
            self._claim_run_dir(overwrite, resume)
        for path in (cfg.prompt_file, cfg.eval_prompt_file):
            if path:
                load_prompts(path)  # fail on a bad file before any expensive set-up
        if world is None:
            # a missing cache is built (which draws random numbers) BEFORE seeding, so that the
            # adapter's initialisation does not depend on whether the cache already existed
            world_cls.prepare(cfg, progress)
        torch.manual_seed(cfg.seed)
        self._build(world_cls, method_cls, world, reward, method)
        self.step, self.train_seconds = 0, 0.0
        self.bad_steps = self.bad_in_a_row = 0  # updates skipped for non-finite values: in all, in a row
        self._step_bad = False
        self.base_eval_images = self.last_eval_images = None

    def _claim_run_dir(self, overwrite: bool, resume: str | None) -> None:
        """The run directory's lock, and the checkpoint to resume from (refused if it is another run's)."""
        cfg, run_dir = self.cfg, self.run_dir
        # One writer per run directory: the lock (which also proves the folder writable) comes after the
        # read-only checks above, so a refused command creates nothing, and before any expensive work;
        # the checks are repeated under it, as another writer may have changed the folder meanwhile.
        self.lock = RunLock(run_dir)
        if self.main:
            self.lock.acquire()
            resolve_run_dir(cfg, overwrite, resume)
        # --resume latest of a run killed before its first checkpoint starts it again, as its hint says
        self.restarted = (resume in (None, "latest") and not overwrite and (run_dir / "config.yaml").is_file()
                          and not started(run_dir))
        if self.restarted:
            resume = self.resume = None
        self.resume_from = ckpt.find_checkpoint(resume, run_dir) if resume is not None else None
        self.resume_state = ckpt.read_checkpoint(self.resume_from) if self.resume_from is not None else None
        if self.resume_state is not None:  # a checkpoint belongs to its run, and to no later step than asked for
            ckpt.check_belongs(self.resume_from, self.resume_state[1], to_dict(cfg), RESUMABLE_CHANGES, steps=cfg.steps)

    def _build(self, world_cls, method_cls, world, reward, method) -> None:
        """World, reward, method, prompts, optimiser and EMA (ready objects from the caller are used as they are)."""
        cfg, device = self.cfg, self.accelerator.device
        full = {"lora": False} if cfg.finetune == "full" else {}  # full fine-tuning: no adapter, every weight trains
        self.world = world if world is not None else world_cls.from_config(cfg, device, transition=method_cls.transition(cfg), **full)
        exporting.check_run_formats(self.world, cfg)  # export formats it cannot write: refused before training
        self.full = finetune.attach(self.world, cfg, self.accelerator.num_processes)  # None for LoRA
        self.reward = (as_training_reward(reward) if reward is not None
                       else build_weighted(cfg.reward_weights, reward_context(self.world, cfg, device)))
        # held-out rewards (never in the loss), each scored alone on the evaluation chains: eval_heldout_NAME
        ctx = reward_context(self.world, cfg, device)
        self.heldout = {name: (float(w), build_reward(name, ctx)) for name, w in cfg.eval_reward_weights.items()}
        self.method = method if isinstance(method, Method) else method_cls(cfg, self.world, self.reward)
        self.num_steps = method_cls.chain_length(cfg)
        self.prompts = prompt_split(cfg, self.world)
        self.train_prompts, self.eval_prompts = self.prompts.train, self.prompts.eval
        self.params = self.world.trainable_parameters()
        if not self.params:
            raise UserError(f"the {self.world.name} world has no trainable parameters (no adapter attached)")
        # LoRA over several ranks: the engine's reducer (DDP in place) averages the adapter gradients in backward
        self.engine_reduces = self.collective or (self.full is None and dist.dist_on(self.shard.count))
        if self.engine_reduces and not self.collective:
            finetune.replicate_lora(self.world.network)
        optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # sharded by us (fully_shard): accelerate's FSDP2 prepare would want to shard the model itself
        self.optimizer = optimizer if self.collective else self.accelerator.prepare(optimizer)
        self.ema = ckpt.EMA(self.params, cfg.ema_decay) if cfg.ema_decay is not None else None

    # --- evaluation pieces -----------------------------------------------------------------------
    def _noise(self, n: int, generator: torch.Generator) -> ChainNoise:
        return ChainNoise.draw(n, self.world.latent_shape, self.num_steps, generator, self.world.device, self.world.dtype)

    def _eval_set(self, size: int, offset: int):
        prompts = eval_prompt_set(self.eval_prompts, size)
        gen = torch.Generator().manual_seed(self.cfg.seed + offset)
        return prompts, self._noise(len(prompts), gen)

    def _ema_applied(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate_fixed(self) -> dict:
        """Scores of the fixed evaluation chains (with the EMA when one is kept)."""
        with self._ema_applied():
            scores, images = evaluate(self.world, self.reward, self.eval_set[0], self.eval_set[1], self.num_steps, self.cfg,
                                      extra_rewards=self.heldout)
        self.last_eval_images = images
        return {f"eval_{k}": v.mean().item() for k, v in scores.items()}

    def grid(self, images: torch.Tensor, step: int) -> None:
        """grids/step_N.png: a row per evaluation prompt, labelled with it (and the step and K); also to the trackers."""
        per = math.ceil(len(self.eval_set[0]) / len(self.eval_prompts))
        ncol = min(per, 8)
        rows = [(p, images[i * per : i * per + ncol]) for i, p in enumerate(self.eval_prompts[:10])]
        path = self.run_dir / "grids" / f"step_{step:06d}.png"
        with writing("the sample grid", path):
            picture = save_labelled_grid(rows, path, f"step {step}, K={self.num_steps} (fixed evaluation noise)")
        tracking.log_image(self.accelerator, "samples", picture, step)

    def _regulariser_line(self) -> str:
        """What divergence_steps / divergence_sampling "auto" became for this method, said once at the start."""
        method_cls = type(self.method)
        if not (method_cls.per_step_divergence and self.cfg.beta > 0):
            return ""
        steps = method_cls.divergence_steps(self.cfg)
        if steps == "all":
            return "; divergence at every step"
        return f"; divergence at {steps} step(s) per update, drawn {method_cls.divergence_sampling(self.cfg)} (unbiased)"

    def log(self, row: dict) -> None:
        if not self.main:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with writing("metrics", self.run_dir / "metrics.jsonl"), open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        tracking.log_row(self.accelerator, row, row["step"])

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """One update of the trainable parameters from `loss`; returns the gradient norm before clipping
        (NaN when the update is skipped). Methods call it once per update they make."""
        if self.engine_reduces:  # FSDP / DDP reduced the gradients in backward: only the bad-step flag is agreed
            norm = finetune.reduced_optimizer_step(self.optimizer, self.params, loss, self.accelerator, self.shard.count,
                                                   self.cfg.grad_clip)
            self._step_bad = self._step_bad or not math.isfinite(norm)
            return norm
        self.optimizer.zero_grad(set_to_none=True)
        params = self.params
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        if not local_bad:
            self.accelerator.backward(loss)
        # Every rank reaches this all-reduce (also after a non-finite loss): the flat gradient plus a
        # bad-flag, so that all ranks take the same skip-or-step decision.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in params] + [torch.tensor([float(local_bad)], device=params[0].device)])
        dist.all_reduce_mean_(flat, self.accelerator.num_processes)
        if bool(flat[-1] > 0) or not bool(torch.isfinite(flat).all()):
            self.optimizer.zero_grad(set_to_none=True)
            self._step_bad = True
            return float("nan")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        grad_norm = torch.norm(flat[:-1])
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        return float(grad_norm)

    # --- the phases of a run ---------------------------------------------------------------------
    def train(self) -> TrainResult:
        # One generator seeded identically on every rank: each step draws the GLOBAL batch of prompts
        # and chain noise, and every rank keeps its own slice (self.shard).
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000)
        try:
            with StopSignals() as self.stop:  # SIGTERM/SIGINT: finish the step, checkpoint, stop (Preempted)
                return self._run(gen)
        except Exception as exc:  # an exception raised inside a plug-in's code: one line naming it and the step
            error = as_plugin_error(exc, self.plugins, f"at step {self.step}; {self._last_good()}")
            if error is not None:
                raise error from exc
            raise
        finally:
            self.lock.release()

    def _run(self, gen: torch.Generator) -> TrainResult:
        """Restore, open the run, the steps, the checks of what they did, the closing writes."""
        start_step = self._restore(gen)
        self._open_run(start_step)
        before = parameter_fingerprint(self.params) if not self.collective else None
        bar = tqdm(range(start_step + 1, self.cfg.steps + 1), desc=f"{self.cfg.method} {self.cfg.world}",
                   disable=not (self.progress and self.main))
        for step in bar:
            row = self._train_step(step, self._draw_batch(gen))
            last = step == self.cfg.steps or self._time_up()
            self._check_bad_steps(row, bar)
            self._log_and_evaluate(row, last, bar)
            self._checkpoint(gen, last)
            self._check_preempted(gen, bar)
            if last:
                self._announce_stop()
                break
        self._check_updated(start_step, before)
        return self._close()

    def _restore(self, gen: torch.Generator) -> int:
        """Parameters, optimiser, EMA, generator, counters and method state of the checkpoint resumed from."""
        if self.resume_state is None:
            return 0
        tensors, meta = self.resume_state
        if self.full is not None:  # sharded (DCP) state, resharded to however many ranks run now
            finetune.restore(self.resume_from, tensors, meta, self.world.network, self.optimizer, self.ema, gen, self.method)
        else:
            ckpt.restore(tensors, meta, self.params, self.optimizer, self.ema, gen, method=self.method)
        self.step = int(meta["step"])
        self.train_seconds = float(meta["train_seconds"])
        self.bad_steps = int(meta.get("bad_steps", 0))
        self.bad_in_a_row = int(meta.get("bad_in_a_row", 0))
        self.resume_state = None
        return self.step

    def _open_run(self, start_step: int) -> None:
        """The run directory, its config and metrics file, trackers; the step-0 evaluation of a new run."""
        cfg, nproc = self.cfg, self.accelerator.num_processes
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if start_step == 0 and self.resume_from is None:
                # --overwrite, or a restart: nothing of the old run may be resumed or pruned against later;
                # deleted only now that the new run's config is validated and everything is built
                clear_run_artefacts(self.run_dir)
                if self.restarted:
                    print(f"cmalign: {self.run_dir} holds this run, stopped before its first checkpoint: starting it again",
                          flush=True)
            else:
                # checkpoints beyond the one resumed from belong to an abandoned continuation
                ckpt.remove_newer(self.run_dir / "checkpoints", start_step)
                ckpt.remove_temporaries(self.run_dir / "checkpoints")
                with writing("metrics", self.run_dir / "metrics.jsonl"):
                    ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
            with writing("the config", self.run_dir / "config.yaml"):
                (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            with writing("the prompts", self.run_dir / "prompts.json"):  # what trained and what evaluates
                (self.run_dir / "prompts.json").write_text(json.dumps(self.prompts.as_json(), indent=2, ensure_ascii=False))
            # the whole configuration on screen for an interactive run; experiments' runs (progress off) name the file
            print(f"cmalign: resolved config -> {self.run_dir / 'config.yaml'}" + (f"\n{to_yaml(cfg)}" if self.progress else ""), flush=True)
            print(f"cmalign: {nproc} process(es) x batch {cfg.batch_size} per process = global batch "
                  f"{nproc * cfg.batch_size}; {cfg.steps} steps = {cfg.steps * nproc * cfg.batch_size} samples"
                  + (f"; resuming from {self.resume_from} (step {start_step})" if self.resume_from else "")
                  + self._regulariser_line(), flush=True)
        tracking.init_run_trackers(self.accelerator, self.run_dir, cfg.report_to, flat_items(to_dict(cfg)), start_step)
        self.eval_set = self._eval_set(cfg.eval_size, EVAL_SEED_OFFSET)
        if start_step == 0 and (self.main or self.collective):  # sharded: every rank takes part in the forwards
            row = {"step": 0, **self.evaluate_fixed()}
            if self.main:
                self.grid(self.last_eval_images, 0)
            self.base_eval_images = self.last_eval_images
            self.log(row)

    def _draw_batch(self, gen: torch.Generator) -> Batch:
        """The global batch of prompts from the run's generator; this rank's slice, widened by the method."""
        b = self.cfg.batch_size
        idx = torch.randint(0, len(self.train_prompts), (b * self.shard.count,), generator=gen)
        prompts = [self.train_prompts[i] for i in self.shard.take(idx, b).tolist()]
        return Batch(self.method.batch_prompts(prompts), gen, self.shard)

    def _train_step(self, step: int, batch: Batch) -> dict:
        """The method's step, the EMA and the bad-step counters; the step's metrics row (mean over ranks)."""
        self.step, self._step_bad = step, False
        start = time.perf_counter()
        metrics, images = self._check_step_result(self.method.step(batch, self.optimizer_step))
        if self._step_bad:
            self.bad_steps += 1
            self.bad_in_a_row += 1
        else:
            self.bad_in_a_row = 0
            if self.ema is not None:
                self.ema.update()
        self.train_seconds += time.perf_counter() - start
        row = {"step": step, **metrics, "wall_time": round(self.train_seconds, 3)}
        row.update(self.world.step_metrics(images, batch.prompts))
        row = dist.gather_metrics(row, self.shard.count, self.accelerator.device)
        samples = step * self.cfg.batch_size * self.shard.count
        return {**row, "step": step, "samples": samples, "skipped": self._step_bad, "bad_steps": self.bad_steps}

    # --- what the steps did (a run that trained nothing never reports success) -----------------------
    def _last_good(self) -> str:
        found = ckpt.list_checkpoints(self.run_dir / "checkpoints") if self.main else []
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _check_updated(self, start_step: int, before: list | None) -> None:
        """Refuse success to a run in which no update was applied (every step skipped for non-finite values,
        whatever steps and max_bad_steps are), or whose trainable parameters did not change."""
        if self.step > 0 and self.bad_steps >= self.step:
            raise UserError(f"no update was applied: all {self.step} steps were skipped for non-finite reward, loss or "
                            f"gradients (see the warnings above and metrics.jsonl); {self._last_good()}")
        if before is not None and self.step > start_step and parameter_fingerprint(self.params) == before:
            raise UserError(f"the trainable parameters did not change in {self.step - start_step} steps (grad_norm "
                            "0 at every step): the loss does not depend on them, e.g. a reward whose scores are "
                            f"detached from the images; {self._last_good()}")

    def _check_step_result(self, out) -> tuple[dict, torch.Tensor]:
        """A method's step returns (metrics of numbers, images) as Method.step promises."""
        ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict) and isinstance(out[1], torch.Tensor)
              and all(isinstance(k, str) and (v is None or isinstance(v, (int, float))) for k, v in out[0].items()))
        if not ok:
            what = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {', '.join(type(o).__name__ for o in out)}"
            raise UserError(f"method {self.cfg.method!r}: step() returned {what} at step {self.step}; expected "
                            "(metrics: dict of name -> float, images: tensor)")
        return out

    def _check_bad_steps(self, row: dict, bar) -> None:
        if self.bad_in_a_row < self.cfg.max_bad_steps:
            return
        self.log(row)
        bar.close()
        found = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        where = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise UserError(f"stopping at step {self.step}: {self.bad_in_a_row} updates in a row were skipped for "
                        f"non-finite reward, loss or gradients (max_bad_steps={self.cfg.max_bad_steps}); {where}")

    def _log_and_evaluate(self, row: dict, last: bool, bar) -> None:
        cfg, step = self.cfg, self.step
        if not (self.main or self.collective):
            return
        if step % cfg.eval_every == 0 or last:
            row.update(self.evaluate_fixed())
            self.shown = {k: row[k] for k in row if k in ("eval_reward", "eval_gold") or k.startswith("eval_heldout_")}
        if step % cfg.grid_every == 0 or last:
            if step % cfg.eval_every and not last:
                self.evaluate_fixed()
            if self.main:
                self.grid(self.last_eval_images, step)
        self.log(row)
        shown = {**{k: row[k] for k in ("reward", "divergence", "loss") if k in row}, **getattr(self, "shown", {})}
        bar.set_postfix({k.replace("eval_heldout_", "heldout_"): f"{v:.3g}" for k, v in shown.items()
                         if isinstance(v, (int, float)) and math.isfinite(v)}, refresh=False)

    def _checkpoint(self, gen: torch.Generator, last: bool) -> None:
        """Every checkpoint_every steps, and at an early stop (time budget) so that --resume continues."""
        every, step = self.cfg.checkpoint_every, self.step
        if not ((self.main or self.collective) and every) or self._step_bad:
            return
        if step % every == 0 or (last and step < self.cfg.steps):
            self.save_checkpoint(gen)

    def _check_preempted(self, gen: torch.Generator, bar) -> None:
        """After a SIGTERM/SIGINT (on any rank): a checkpoint of this step, then Preempted (the CLI prints
        the resume command and exits 128 + signal)."""
        signum = int(dist.all_reduce_max(float(self.stop.signum or 0), self.shard.count, self.accelerator.device))
        if not signum:
            return
        bar.close()
        path = None
        if self.main or self.collective:  # a sharded checkpoint is written by every rank
            found = ckpt.list_checkpoints(self.run_dir / "checkpoints")
            done = found and found[-1].name == f"step_{self.step:06d}"  # written by _checkpoint just now
            path = found[-1] if done else self.save_checkpoint(gen)  # also at a skipped step: its state is exact
        raise Preempted(signum, self.step, path, self.run_dir)

    def _announce_stop(self) -> None:
        if self.step < self.cfg.steps and self.main:
            print(f"cmalign: stopping at step {self.step}: {self.train_seconds:.1f} train seconds reached "
                  f"max_train_seconds={self.cfg.max_train_seconds:g}", flush=True)

    def _time_up(self) -> bool:
        """The train-seconds budget is spent (on any rank: every rank stops at the same step)."""
        if self.cfg.max_train_seconds is None:
            return False
        spent = dist.all_reduce_max(self.train_seconds, self.shard.count, self.accelerator.device)
        return spent >= self.cfg.max_train_seconds

    def _close(self) -> TrainResult:
        """Every rank leaves together (a rank exiting while the main process still writes its report
        would abort gloo); then the main process writes the adapter, final evaluation and report."""
        nproc = self.accelerator.num_processes
        self.accelerator.wait_for_everyone()
        if self.full is not None:  # sharded networks back to plain ones with the full weights (a collective)
            self.params = self.full.gather(self.ema)
        if dist.check_ranks_agree(self.params, nproc) and self.main:
            what = "network" if self.full is not None else "adapter"
            print(f"cmalign: {what} parameters identical across {nproc} ranks", flush=True)
        dist.teardown(nproc)  # (the process then ends through distributed.end_process: see there)
        final = self.finish() if self.main else {}
        for tracker in self.accelerator.trackers:  # (end_training would also tear down the process group)
            tracker.finish()
        metrics = report.read_metrics(self.run_dir) if self.main and (self.run_dir / "metrics.jsonl").is_file() else []
        return TrainResult(self.run_dir, self.cfg, metrics, final, list(self.eval_set[0]), self.base_eval_images,
                           self.last_eval_images, self.world, self.reward)

    @property
    def collective(self) -> bool:
        """The network is sharded over the ranks: its forwards and checkpoints need every rank."""
        return getattr(self, "full", None) is not None and self.full.sharded

    def save_checkpoint(self, gen: torch.Generator) -> Path:
        """checkpoints/step_XXXXXX (main process only; no collectives)."""
        scalars = {"train_seconds": self.train_seconds, "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row,
                   "data_position": {"generator": "rng.generator", "step": self.step}}
        if self.full is not None:  # every rank writes its shards (torch.distributed.checkpoint)
            return finetune.save_checkpoint(self.run_dir / "checkpoints", self.step, self.world.network, self.optimizer,
                                            self.ema, gen, scalars, self.cfg.keep_checkpoints, config=to_dict(self.cfg),
                                            resumable=RESUMABLE_CHANGES, method=self.method, main=self.main,
                                            num_processes=self.shard.count)
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.world, self.params, self.optimizer,
                                    self.ema, gen, scalars, self.cfg.keep_checkpoints,
                                    config=to_dict(self.cfg), resumable=RESUMABLE_CHANGES, method=self.method)

    def finish(self) -> dict:
        """The final adapter (the EMA's when one is kept), base vs tuned on fresh held-out noise, report."""
        cfg = self.cfg
        final: dict = {}
        # measured before the final evaluation's chains (their memory is not training's)
        self.cost = cost.run_cost(report.read_metrics(self.run_dir) if (self.run_dir / "metrics.jsonl").is_file() else [],
                                  self.accelerator.device)
        with self._ema_applied():
            # written whole or not at all: a present adapter/ marks a finished run
            with atomic_dir(self.run_dir / "adapter", "the adapter") as tmp:
                finetune.save_trained(self.world, tmp, cfg)  # LoRA adapter, or the whole network (full)
                exporting.write_run_formats(self.world, tmp, cfg)  # e.g. lora_kohya.safetensors (lcm.export_formats)
            if cfg.final_eval_size > 0:
                final = self._final_evaluation()
        report.plot_curves(self.run_dir)
        summary = f"`{cfg.method}` on `{cfg.world}`: K={self.num_steps}, beta={cfg.beta} ({cfg.divergence}), lr={cfg.lr}, " \
                  f"{self.step} steps x batch {cfg.batch_size}, {self.train_seconds:.0f} s of training."
        summary += " " + cost.describe(self.cost)
        print(f"cmalign: {cost.describe(self.cost)}", flush=True)
        if final:
            shown = "; ".join(f"`{p}`" for p in self.eval_prompts[:20]) + (" ..." if len(self.eval_prompts) > 20 else "")
            kind = "held out: none of them trains" if self.prompts.held_out else "NOT held out: they are training prompts"
            summary += f"\n\nEvaluation prompts ({kind}; {self.prompts.how}; prompts.json lists both sets): {shown}."
            report.write_report(self.run_dir, summary, final)
        report.write_html_report(self.run_dir, summary, final, getattr(self, "report_samples", []))
        return final

    def _final_evaluation(self) -> dict:
        """The same prompts and noise for the base (adapter off) and the tuned model."""
        prompts, noise = self._eval_set(self.cfg.final_eval_size, FINAL_SEED_OFFSET)
        final, images, chains = {"n": self.cfg.final_eval_size}, {}, {}
        final["cost"] = self.cost  # seconds per step and peak memory of the training (cost.py)
        with tqdm(total=2 * len(prompts), desc="final evaluation (base, tuned)", disable=not self.progress) as bar:
            for label, use_adapter in (("base", False), ("tuned", True)):
                chains[label], images[label] = evaluate(self.world, self.reward, prompts, noise, self.num_steps,
                                                        use_adapter=use_adapter, extra_rewards=self.heldout, on_batch=bar.update)
                final[label] = {k: summarize(v) for k, v in chains[label].items()}
                final[label]["diversity"] = self.world.diversity(images[label], prompts)
        with writing("the final evaluation", self.run_dir / "final_eval.json"):
            (self.run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
        with writing("the per-chain final evaluation", self.run_dir / "final_eval_chains.csv"):
            write_chain_scores(self.run_dir / "final_eval_chains.csv", prompts, chains["tuned"], chains["base"])
        self._before_after(images["base"], images["tuned"], prompts)
        return final

    def _before_after(self, base: torch.Tensor, tuned: torch.Tensor, prompts: list[str]) -> None:
        """Rows alternate base / tuned for each prompt (same noise), up to 8 samples each, labelled; the first
        sample of each as report_images/ PNGs for report.html."""
        distinct = list(dict.fromkeys(prompts))[:10]
        ncol = min(8, min(prompts.count(p) for p in distinct))
        rows = []
        for p in distinct:
            idx = [i for i, q in enumerate(prompts) if q == p][:ncol]
            rows += [(f"base: {p}", base[idx]), (f"tuned: {p}", tuned[idx])]
        if rows:
            with writing("the before/after grid", self.run_dir / "before_after.png"):
                save_labelled_grid(rows, self.run_dir / "before_after.png", f"base vs tuned, K={self.num_steps}, same noise")
            self.report_samples = report.save_report_samples(self.run_dir, distinct, prompts, base, tuned, self.num_steps)


def parameter_fingerprint(params) -> list[tuple[float, float]]:
    """Per parameter, the float64 sum and sum of squares: any update changes them."""
    with torch.no_grad():
        return [(float(p.detach().double().sum()), float(p.detach().double().square().sum())) for p in params]


def plugin_labels(cfg: TrainConfig, world_cls, method_cls, reward) -> dict[str, str]:
    """module -> label of the run's plug-ins (whose exceptions are one line naming them)."""
    labels = reward_plugins(cfg.reward_weights, reward)
    for kind, cls, name in (("world", world_cls, cfg.world), ("method", method_cls, cfg.method)):
        module = plugin_module(cls)
        if module:
            labels[module] = f"{kind} {name!r}"
    return labels


def check_train_arguments(config, world, reward, method) -> None:
    """train()'s arguments have types it accepts: one TypeError line naming the argument otherwise."""
    if not isinstance(config, TrainConfig):
        hint = {str: "; for a YAML file: cmalign.config.load_preset(path)", dict: "; from a dict: TrainConfig(**values)"}
        raise TypeError(f"train(config): expected a TrainConfig (from cmalign import TrainConfig), got "
                        f"{type(config).__name__}{hint.get(type(config), '')}")
    if world is not None and not isinstance(world, World):
        what = f"the class {world.__name__} (pass an instance)" if isinstance(world, type) else type(world).__name__
        name_hint = f"; to choose a world by name: TrainConfig(world={world!r})" if isinstance(world, str) else ""
        raise TypeError(f"train(world=...): expected a World instance (or None: the config's world), got {what}{name_hint}")
    if reward is not None and not callable(reward):
        raise TypeError(f"train(reward=...): expected a callable (images, prompts) -> scores (or None: the config's "
                        f"reward_weights), got {type(reward).__name__}")
    if method is not None and not isinstance(method, (str, Method)) and not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"train(method=...): expected a registered name, a Method subclass or instance (or None), "
                        f"got {type(method).__name__}")


def _method_class_of(method) -> type[Method]:
    if isinstance(method, Method):
        return type(method)
    if isinstance(method, type) and issubclass(method, Method):
        return method
    if isinstance(method, str):
        return method_class(method)
    raise UserError(f"method must be a registered name, a Method subclass or instance, got {type(method).__name__}")


def train(config: TrainConfig, *, world: World | None = None, reward=None, method=None, overwrite: bool = False,
          progress: bool = True, resume: str | None = None) -> TrainResult:
    """Train `config`; `world`, `reward` and `method` may be ready objects in place of the config's names:
    a World instance, any reward callable (images, prompts) -> (B,) scores, a Method subclass or instance."""
    check_train_arguments(config, world, reward, method)
    if not isinstance(overwrite, bool) or not isinstance(progress, bool):
        raise TypeError(f"train(overwrite=..., progress=...): expected True or False, got {overwrite!r}, {progress!r}")
    if resume is not None and not isinstance(resume, str):
        raise TypeError(f"train(resume=...): expected 'latest' or a checkpoint path (str), got {type(resume).__name__}")
    trainer = Trainer(config, world=world, reward=reward, method=method, overwrite=overwrite, progress=progress, resume=resume)
    return trainer.train()
