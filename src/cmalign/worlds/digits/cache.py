"""The digits world's base models: found in the cache, else the shipped weights, else pretrained.

A base-model folder holds consistency.safetensors, teacher.safetensors and manifest.json (the
pretraining config and its hash, the data hash, seed, library versions, timings).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cmalign.cache import build_lock, cache_root, config_hash, manifest, publish_dir, shipped_asset, staging_dir
from cmalign.errors import UserError
from cmalign.worlds.digits.data import data_hash
from cmalign.worlds.digits.nets import load_weights, save_weights
from cmalign.worlds.digits.pretrain import PretrainConfig, build_network, grid_pretrain_config, pretrain


def base_key(cfg: PretrainConfig) -> str:
    config = asdict(cfg)
    if config.pop("grid") == 1:  # the plain digits keep the keys (and shipped folders) they had before grids
        return f"r{cfg.resolution}-{cfg.model_size}-{config_hash(config)}"
    return f"grid{cfg.grid}-{cfg.model_size}-{config_hash(asdict(cfg))}"


def cached_dir(cfg: PretrainConfig) -> Path:
    return cache_root() / "digits" / base_key(cfg)


def shipped_dir(cfg: PretrainConfig) -> Path | None:
    """Weights that ship inside the package for the default recipe (fp16, see its manifest)."""
    return shipped_asset(base_key(cfg))


def pretrain_command(cfg: PretrainConfig) -> str:
    """The command that rebuilds these models (step counts only where they differ from the defaults)."""
    default = grid_pretrain_config(cfg.grid, cfg.model_size) if cfg.grid > 1 else PretrainConfig()
    steps = "".join(f" --{name.replace('_', '-')} {getattr(cfg, name)}" for name in ("teacher_steps", "distill_steps")
                    if getattr(cfg, name) != getattr(default, name))
    where = f"--grid {cfg.grid}" if cfg.grid > 1 else f"--resolution {cfg.resolution}"
    return f"cmalign pretrain digits {where} --model-size {cfg.model_size}{steps}"


def write_base(folder: Path, cfg: PretrainConfig, teacher, consistency, stats: dict, dtype=torch.float32) -> None:
    """Write both networks and the manifest that records how they were made."""
    save_weights(consistency, folder / "consistency.safetensors", dtype=dtype)
    save_weights(teacher, folder / "teacher.safetensors", dtype=dtype)
    info = manifest(
        kind="digits-base",
        key=base_key(cfg),
        config=asdict(cfg),
        data_sha256_16=data_hash(),
        seed=cfg.seed,
        stats=stats,
        command=pretrain_command(cfg),
        dtype=str(dtype).replace("torch.", ""),
    )
    (folder / "manifest.json").write_text(json.dumps(info, indent=2))


def build_and_cache(cfg: PretrainConfig, progress: bool = True, force: bool = False) -> Path:
    """Run pretraining and publish the result into the cache atomically."""
    final = cached_dir(cfg)
    with build_lock(final):
        if final.exists() and not force:
            return final
        start = time.time()
        teacher, consistency, stats = pretrain(cfg, progress=progress)
        stats["wall_seconds"] = round(time.time() - start, 1)
        tmp = staging_dir(final)
        write_base(tmp, cfg, teacher, consistency, stats)
        if force and final.exists():
            shutil.rmtree(final)
        publish_dir(tmp, final)
    return final


def locate(cfg: PretrainConfig, allow_pretrain: bool = True, progress: bool = True) -> Path:
    cached = cached_dir(cfg)
    if cached.exists():
        return cached
    shipped = shipped_dir(cfg)
    if shipped is not None:
        return shipped
    if not allow_pretrain:
        raise UserError(f"no digits base model for {base_key(cfg)}; run `cmalign pretrain digits` first")
    print(f"cmalign: pretraining the digits base models into {cached} (once; reused afterwards)", flush=True)
    return build_and_cache(cfg, progress=progress)


def load_base(cfg: PretrainConfig, which: str = "consistency", allow_pretrain: bool = True, progress: bool = True):
    """Return (network, folder, manifest) for `which` in {consistency, teacher}."""
    folder = locate(cfg, allow_pretrain, progress)
    net = build_network(cfg)
    path = folder / f"{which}.safetensors"
    try:
        info = json.loads((folder / "manifest.json").read_text())
        load_weights(net, path)
    except Exception as exc:  # a truncated or foreign file: say which and how to rebuild
        raise UserError(
            f"the digits base model at {folder} is unreadable ({type(exc).__name__}); "
            f"delete that folder or run `cmalign pretrain digits --force`"
        ) from None
    return net.eval().requires_grad_(False), folder, info
