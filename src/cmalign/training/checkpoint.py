"""Exact-resume checkpoints and the EMA of the trainable parameters (cross-rank helpers: distributed.py).

A checkpoint is a directory `checkpoints/step_XXXXXX/` holding
  adapter file(s)        the world's own adapter format (safetensors), usable like a run's adapter/
  state.safetensors      trainable parameters, optimiser tensors, EMA, RNG byte states
  state.json             scalar state: step, train_seconds, counters, optimiser param_groups, RNG
                         states of numpy and python random, the method's own state (reward
                         buffers), and the run's config with its fingerprint (checked on resume)
It is written under a temporary name and renamed into place (atomic on POSIX), so a run killed at
any instant leaves either the previous or the new checkpoint, never a half-written one. Nothing is
pickled: safetensors + JSON only (no torch.load).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmalign.errors import UserError
from cmalign.training.run_dir import write_error_cause

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = 2  # 2: state.json carries the run's config and its fingerprint, and the method's state
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


# --- EMA -----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the trainable parameters (float32 shadows)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Parameters hold the EMA inside the block and their own values again after it."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)


# --- RNG state -----------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> tuple[dict, dict]:
    tensors = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
               "python": [version, list(internal), gauss_next]}
    return tensors, scalars


def set_rng_state(generator: torch.Generator, tensors: dict, scalars: dict) -> None:
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --- optimiser state as tensors + JSON -----------------------------------------------------------
def optimizer_flat(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_unflat(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- the run a checkpoint belongs to -------------------------------------------------------------
def _flat(config: dict, prefix: str = "") -> dict:
    """{"ppo": {"clip": 1}} -> {"ppo.clip": 1}, values normalised through JSON (tuples are lists)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def _ignored(name: str, resumable) -> bool:
    return any(name == r or name.startswith(f"{r}.") for r in resumable)


def config_fingerprint(config: dict, resumable=()) -> str:
    """Hash of a run's config without the fields a resume may change (steps, logging, output_dir)."""
    kept = {k: v for k, v in _flat(config).items() if not _ignored(k, resumable)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(stored: dict, now: dict, resumable=()) -> list[str]:
    a, b = _flat(stored), _flat(now)
    return sorted(k for k in set(a) | set(b) if not _ignored(k, resumable) and a.get(k, "<unset>") != b.get(k, "<unset>"))


def check_belongs(path: Path, meta: dict, config: dict, resumable=(), steps: int | None = None) -> None:
    """Refuse a checkpoint written under another config (a foreign run's weights would otherwise
    replace this run's adapter and report), or one beyond the steps this run is asked to train."""
    want = config_fingerprint(config, resumable)
    if meta.get("config_hash") != want:
        stored = meta.get("config")
        diff = config_differences(stored, config, resumable) if isinstance(stored, dict) else []
        what = f" ({', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''})" if diff else ""
        raise UserError(f"--resume: checkpoint {path} belongs to a run with a different config{what}; resume it "
                        "with its own settings and output_dir, or start a new run")
    if steps is not None and int(meta["step"]) > steps:
        raise UserError(f"--resume: checkpoint {path} is at step {meta['step']}, beyond steps={steps}; "
                        f"pass --steps {meta['step']} or more")


# --- writing and reading -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def remove_temporaries(root: Path) -> None:
    """Drop leftovers of writes that a killed or failed run did not finish (.tmp_* / .old_*).
    Only the lock holder writes here, so none of them is in progress."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(root: Path, step: int, world, params, optimizer, ema: EMA | None, generator,
                    scalars: dict, keep: int, *, config: dict | None = None, resumable=(), method=None) -> Path:
    """Write checkpoints/step_XXXXXX atomically and keep the newest `keep` of them.

    `config` (the run's resolved config as a dict) and its fingerprint without the `resumable` fields
    go into state.json, so that another run refuses the checkpoint; `method` (with state_dict()) adds
    the method's own state (reward buffers, ...). A failed write (full disk, read-only folder) is a
    UserError that leaves the previous checkpoints as they were and no temporary folder behind."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    old = root / f".old_step_{step:06d}"
    before = list_checkpoints(root)
    last_good = f"the last good checkpoint {before[-1]} is intact" if before else "no earlier checkpoint exists"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root)
        tmp.mkdir()
        world.save_adapter(tmp)
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        opt_t, opt_meta = optimizer_flat(optimizer)
        tensors.update(opt_t)
        if ema is not None:
            tensors.update({f"ema.{i}": s.cpu().contiguous() for i, s in enumerate(ema.shadow)})
        rng_t, rng_s = rng_state(generator)
        tensors.update(rng_t)
        method_meta = {}
        if method is not None:
            method_t, method_meta = method.state_dict()
            tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method_t.items()})
        meta = {"format": FORMAT, "step": step, **scalars, "optimizer": opt_meta, "rng": rng_s, "method": method_meta}
        if config is not None:
            meta["config"] = _flat(config)
            meta["config_hash"] = config_fingerprint(config, resumable)
        save_file(tensors, str(tmp / STATE_TENSORS))
        with open(tmp / STATE_JSON, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / STATE_TENSORS, "rb+") as f:
            os.fsync(f.fileno())
        if final.exists():  # rewritten at the same step: move the old one aside, never delete it first
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except Exception as exc:  # an OSError, or a library's wrapping of one (safetensors on a full disk)
        shutil.rmtree(tmp, ignore_errors=True)  # no temporary left behind, whatever failed
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
        cause = write_error_cause(exc)
        if cause is None:
            raise
        raise UserError(f"cannot write checkpoint {final}: {cause}; {last_good}") from None
    shutil.rmtree(old, ignore_errors=True)
    older = [p for p in list_checkpoints(root) if _step_of(p) < step]
    for p in older[:max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=_step_of)


def remove_newer(root: Path, step: int) -> list[Path]:
    """Remove checkpoints beyond `step`: resuming from an earlier checkpoint abandons them, and a later
    `--resume latest` or the pruning must not pick them up instead of the new ones."""
    gone = [p for p in list_checkpoints(root) if _step_of(p) > step]
    for p in gone:
        shutil.rmtree(p)
    return gone


def find_checkpoint(resume: str, run_dir: Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(run_dir / "checkpoints")
        if not found:
            raise UserError(f"--resume latest: {run_dir} holds no checkpoint (looked in {run_dir / 'checkpoints'})")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint directory (expected {STATE_JSON} and {STATE_TENSORS})")
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint; a truncated or corrupt file is a UserError."""
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        if not isinstance(meta, dict) or "step" not in meta or "format" not in meta:
            raise ValueError("missing fields")
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is unreadable ({STATE_JSON}: {type(exc).__name__}); pick another with --resume PATH") from None
    if meta["format"] != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta['format']}; this cmalign reads format {FORMAT} "
                        "(format 1 carried no run config to check it against); start the run again")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is unreadable ({STATE_TENSORS}: {type(exc).__name__}); pick another with --resume PATH") from None
    return tensors, meta


def restore(tensors: dict, meta: dict, params, optimizer, ema: EMA | None, generator, method=None) -> None:
    n = sum(1 for k in tensors if k.startswith("param."))
    if n != len(params):
        raise UserError(f"checkpoint holds {n} trainable tensors; this model has {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            src = tensors[f"param.{i}"]
            if src.shape != p.shape:
                raise UserError(f"checkpoint tensor {i} has shape {tuple(src.shape)}; the model expects {tuple(p.shape)}")
            p.copy_(src)
    optimizer.load_state_dict(optimizer_unflat(tensors, meta["optimizer"]))
    if ema is not None:
        if "ema.0" not in tensors:
            raise UserError("the run has ema_decay set but the checkpoint holds no EMA")
        for i, s in enumerate(ema.shadow):
            s.copy_(tensors[f"ema.{i}"])
    set_rng_state(generator, tensors, meta["rng"])
    if method is not None:
        method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                               meta.get("method") or {})


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps <= step (and drop a half-written last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
