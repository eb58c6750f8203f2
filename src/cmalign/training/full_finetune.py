"""Full fine-tuning (`finetune: full`): every parameter of the consistency network trains, the reference
is a frozen copy of the initial weights, and several ranks shard both with FSDP2 (`fully_shard`).

* **Reference.** "Adapter disabled" does not exist without an adapter, so the world keeps a frozen copy
  of its initial network in `world.reference_network`; `World.reference_policy()` swaps it in for the
  duration of the call (gradient checkpointing recomputes inside the same context, so it recomputes the
  same branch). `reference_offload` keeps the copy's weights on the CPU.
* **Sharding.** With more than one process both networks are sharded at block level (each of the UNet's
  down/mid/up blocks, or the classes an accelerate FSDP config names in `fsdp_transformer_layer_cls_to_wrap`,
  then the root), with a mixed-precision policy of bf16/fp16 parameters for compute and float32 master
  weights and gradient reductions (`mixed_precision`, or the launcher's when that is "no").
  FSDP reduce-scatters (averages) the gradients itself, so the trainer's own all-reduce is not used;
  only the bad-step flag is agreed across ranks (`reduced_optimizer_step`).
* **Checkpoints** (also with one process) are torch.distributed.checkpoint folders: every rank writes its
  own shards of parameters, AdamW moments and EMA into `checkpoints/.tmp_step_N/shards/`, the main process
  adds the RNG and method state (state.safetensors, state.json as for LoRA) and renames the folder into place.
  DCP reshards on load, so a checkpoint resumes on another number of ranks too.
* **Export.** The run's `adapter/` folder of a full fine-tune is a diffusers model folder (config.json +
  diffusion_pytorch_model.safetensors) that `UNet2DModel` / `UNet2DConditionModel.from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmalign.training import checkpoint as ckpt
from cmalign.training import distributed as dist
from cmalign.errors import UserError

SHARDS = "shards"  # the DCP folder inside a checkpoint
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- what the launcher asked for ---------------------------------------------------------------------
def launched_with_fsdp() -> bool:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP (also when cmalign then runs on CPU)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_config(cfg) -> None:
    """Refusals of full fine-tuning (called by config.validate)."""
    if launched_with_fsdp() and cfg.finetune != "full":
        raise UserError("this run was launched with an FSDP config, which shards full fine-tuning: pass --finetune full "
                        "(LoRA runs data-parallel: configs/accelerate/multi_gpu_ddp.yaml or cpu_2proc.yaml)")
    if cfg.finetune != "full":
        if cfg.reference_offload:
            raise UserError("reference_offload moves the frozen copy of full fine-tuning; a LoRA run has none (the reference "
                            "is the same network with the adapter off)")
        return
    if cfg.world == "lcm" and cfg.lcm.lora and cfg.lcm.lora_mode == "stack":
        raise UserError("--finetune full trains every weight: fuse the LCM-LoRA into them (lcm.lora_mode fuse), "
                        "a stacked one would stay frozen beside them")
    if cfg.divergence_fraction != 1.0:
        # sharded forwards are collectives: a rank that drew no chain would skip a reference call the others make
        raise UserError("divergence_fraction < 1 draws the chains per rank, which sharded full fine-tuning cannot "
                        "follow (every rank must call the network alike); use divergence_steps to subsample")


# --- the frozen reference ----------------------------------------------------------------------------
def block_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's blocks, FSDP's wrapping units: the classes named by an accelerate FSDP config
    (fsdp_transformer_layer_cls_to_wrap), else a diffusers UNet's down, mid and up blocks."""
    names = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    if names:
        found = [m for m in network.modules() if type(m).__name__ in names and m is not network]
        if not found:
            raise UserError(f"the FSDP config wraps {', '.join(names)}, which {type(network).__name__} does not contain")
        return found
    blocks = []
    for attr in ("down_blocks", "mid_block", "up_blocks"):
        part = getattr(network, attr, None)
        if isinstance(part, torch.nn.ModuleList):
            blocks += list(part)
        elif isinstance(part, torch.nn.Module):
            blocks.append(part)
    return blocks


def mixed_precision_dtype(cfg) -> torch.dtype | None:
    name = cfg.mixed_precision if cfg.mixed_precision != "no" else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return WEIGHT_DTYPES.get(name)


def shard(network: torch.nn.Module, cfg, *, offload: bool = False) -> torch.nn.Module:
    """fully_shard every block, then the root (FSDP2 on the default process group)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = mixed_precision_dtype(cfg)
    # bf16/fp16 copies for compute; the sharded master weights and the gradient reduction stay float32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else MixedPrecisionPolicy()
    offload_params = offload or os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    policy = CPUOffloadPolicy() if offload_params else OffloadPolicy()
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for block in block_modules(network):
        fully_shard(block, mp_policy=mp, offload_policy=policy, reshard_after_forward=reshard)
    fully_shard(network, mp_policy=mp, offload_policy=policy, reshard_after_forward=reshard)
    return network


class FullFinetune:
    """Attaches full fine-tuning to a world built without an adapter: every network weight trains
    (float32 master weights), a frozen copy is the reference; sharded over the ranks when there are several."""

    def __init__(self, world, cfg, num_processes: int):
        self.world, self.cfg = world, cfg
        self.sharded = dist.dist_on(num_processes)
        net = world.network
        self.network_class = type(net)
        net.float().requires_grad_(True)  # the master weights train in float32 whatever the world loaded
        world.dtype = torch.float32
        reference = copy.deepcopy(net).requires_grad_(False).eval()
        if self.sharded:
            shard(net, cfg)
            shard(reference, cfg, offload=cfg.reference_offload)
        elif cfg.reference_offload and world.device.type != "cpu":
            reference.to("cpu")
            world.reference_offload_device = world.device
        world.reference_network = reference

    # back to plain modules at the end (every rank: a collective)
    def gather(self, ema=None) -> list[torch.nn.Parameter]:
        """Replace the sharded networks by plain ones holding the full weights (on every rank, so that the
        ranks can be compared and the main process export and evaluate without collectives); returns the
        new trainable parameters (the EMA follows them)."""
        world = self.world
        if not self.sharded:
            return world.trainable_parameters()
        names = [n for n, p in world.network.named_parameters() if p.requires_grad]
        world.network = self._plain(world.network, trainable=True)
        world.reference_network = self._plain(world.reference_network, trainable=False)
        params = world.trainable_parameters()
        if [n for n, p in world.network.named_parameters() if p.requires_grad] != names:
            raise RuntimeError("the gathered network's parameters are not in the sharded one's order")
        if ema is not None:
            ema.params, ema.shadow = params, [_full(s) for s in ema.shadow]
        self.sharded = False
        return params

    def _plain(self, module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
        state = {k: _full(v).detach().clone() for k, v in module.state_dict().items()}
        with torch.device("meta"):
            plain = self.network_class.from_config(module.config)
        plain.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*plain.parameters(), *plain.buffers()]):  # a buffer outside the state dict
            plain = self.network_class.from_config(module.config)
            plain.load_state_dict(state)
        return plain.to(self.world.device).requires_grad_(trainable).eval()


def reduced_optimizer_step(optimizer, params, loss: torch.Tensor, accelerator, ranks: int, grad_clip: float) -> float:
    """One update when the engine reduces (averages) the gradients in backward (FSDP2's reduce-scatter,
    or DDP's reducer for data-parallel LoRA): the ranks agree only on whether to skip the update. Every
    rank runs backward, also after a non-finite loss, since the reduction is a collective (the poisoned
    gradients are then dropped on every rank). Returns the gradient norm before clipping, NaN when skipped."""
    optimizer.zero_grad(set_to_none=True)
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    accelerator.backward(loss)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    bad = dist.all_reduce_max(float(local_bad or not math.isfinite(norm)), ranks, accelerator.device)
    if bad > 0:
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    if grad_clip > 0:
        coef = min(1.0, grad_clip / (norm + 1e-6))  # clip_grad_norm_'s rule
        for g in grads:
            g.mul_(coef)
    optimizer.step()
    return norm


def replicate_lora(network: torch.nn.Module) -> None:
    """Data-parallel LoRA on the engine's reducer: DDP applied in place (torch's composable `replicate`),
    so the world keeps its own module. static_graph: methods call the network many times per backward
    (policy and reference, adapter toggled); no buffer broadcast, so that an evaluation forward on the
    main process alone needs no other rank. Measured against the hand-written flat all-reduce in
    benchmarks/lora_reducer_results.md."""
    from torch.distributed._composable import replicate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replicate(network, static_graph=True, broadcast_buffers=False)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def attach(world, cfg, num_processes: int) -> FullFinetune | None:
    """Full fine-tuning of `world` when the config asks for it (None for LoRA)."""
    if cfg.finetune != "full":
        return None
    if getattr(world, "has_adapter", False) or any(p.requires_grad for p in world.network.parameters()):
        raise UserError("--finetune full needs a world built without an adapter (from_config(..., lora=False))")
    return FullFinetune(world, cfg, num_processes)


# --- export ------------------------------------------------------------------------------------------
def save_trained(world, directory: Path, cfg) -> None:
    """The run's adapter/: the LoRA adapter (world format), or for full fine-tuning the whole network as a
    diffusers model folder (float32 master weights)."""
    if cfg.finetune != "full":
        world.save_adapter(directory)
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    world.network.save_pretrained(str(directory), safe_serialization=True)


def load_trained(world, directory: Path, cfg) -> None:
    """Load what save_trained wrote into a world built as for training (full: without adapter)."""
    if cfg.finetune != "full":
        world.load_adapter(directory)
        return
    path = Path(directory) / MODEL_WEIGHTS
    if not path.is_file():
        raise UserError(f"no fully fine-tuned network in {directory} (expected {MODEL_WEIGHTS})")
    try:
        state = load_file(str(path))
        world.network.load_state_dict({k: v.to(world.network.dtype) for k, v in state.items()}, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} does not fit this world's network ({type(exc).__name__}: {str(exc)[:100]})") from None


# --- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------------
def _state(network, optimizer, ema):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    state = {"model": get_model_state_dict(network), "optim": get_optimizer_state_dict(network, optimizer)}
    if ema is not None:
        state["ema"] = dict(zip(names, ema.shadow))
    return state, optimizer


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is the case meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(root: Path, step: int, network, optimizer, ema, generator, scalars: dict, keep: int, *,
                    config: dict, resumable, method, main: bool, num_processes: int) -> Path:
    """checkpoints/step_XXXXXX of a full fine-tune; EVERY rank calls it (each writes its shards).
    Written under .tmp_step_XXXXXX and renamed by the main process once all shards and the metadata are down."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    error = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_temporaries(root)
            tmp.mkdir()
        except OSError as exc:
            error = exc
    failed = dist.all_reduce_max(float(error is not None), num_processes, "cpu")
    if not failed:
        state, _ = _state(network, optimizer, ema)
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp / SHARDS))  # a collective; rank 0 writes .metadata last
        except Exception as exc:  # noqa: BLE001 - DCP wraps OSErrors of any rank
            error = exc
        failed = dist.all_reduce_max(float(error is not None), num_processes, "cpu")
    if main and not failed:
        try:
            _write_main_state(tmp, final, root, step, generator, scalars, config, resumable, method)
        except OSError as exc:
            error, failed = exc, 1.0
    failed = dist.all_reduce_max(float(failed), num_processes, "cpu")
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        before = ckpt.list_checkpoints(root)
        intact = f"the last good checkpoint {before[-1]} is intact" if before else "no earlier checkpoint exists"
        exc = error if isinstance(error, OSError) else getattr(error, "__cause__", None) or error
        cause = (f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, '')})" if isinstance(exc, OSError) and exc.errno
                 else str(exc or "another rank failed to write its shards")[:200])
        raise UserError(f"cannot write checkpoint {final}: {cause}; {intact}")
    if main:
        older = [p for p in ckpt.list_checkpoints(root) if ckpt._step_of(p) < step]
        for p in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _write_main_state(tmp, final, root, step, generator, scalars, config, resumable, method) -> None:
    old = root / f".old_step_{step:06d}"
    tensors, rng_scalars = ckpt.rng_state(generator)
    method_meta = {}
    if method is not None:
        method_t, method_meta = method.state_dict()
        tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method_t.items()})
    meta = {"format": ckpt.FORMAT, "step": step, **scalars, "rng": rng_scalars, "method": method_meta,
            "finetune": "full", "shards": SHARDS, "config": ckpt._flat(config),
            "config_hash": ckpt.config_fingerprint(config, resumable)}
    save_file(tensors, str(tmp / ckpt.STATE_TENSORS))
    with open(tmp / ckpt.STATE_JSON, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    for path in [tmp / ckpt.STATE_TENSORS, *(tmp / SHARDS).iterdir()]:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    if final.exists():  # rewritten at the same step: the old one moves aside, never deleted first
        os.replace(final, old)
    os.replace(tmp, final)
    ckpt._fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def restore(path: Path, tensors: dict, meta: dict, network, optimizer, ema, generator, method=None) -> None:
    """Load a full fine-tune's checkpoint into (possibly sharded) network, optimiser and EMA; DCP reshards
    from however many ranks wrote it. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    shards = Path(path) / meta.get("shards", SHARDS)
    if meta.get("finetune") != "full" or not (shards / ".metadata").is_file():
        raise UserError(f"checkpoint {path} holds no full fine-tuning shards ({shards}/.metadata)")
    state, optimizer = _state(network, optimizer, ema)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(shards))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"checkpoint {path} is unreadable ({SHARDS}: {type(exc).__name__}: {str(exc)[:120]})") from None
    set_model_state_dict(network, state["model"])
    set_optimizer_state_dict(network, optimizer, state["optim"])
    if ema is not None:
        with torch.no_grad():
            for s, loaded in zip(ema.shadow, state["ema"].values()):
                if loaded is not s:
                    s.copy_(loaded)
    ckpt.set_rng_state(generator, tensors, meta["rng"])
    if method is not None:
        method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                               meta.get("method") or {})
