"""Full fine-tuning (`--finetune full`): FSDP2 over 2 gloo ranks = 1 process, sharded checkpoints that
survive SIGKILL and reshard, the exported diffusers folder in the stock loader, the launcher configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmalign import cli
from cmalign.training import full_finetune as finetune
from cmalign.training.checkpoint import list_checkpoints, read_checkpoint
from cmalign.config import validate
from cmalign.errors import UserError
from cmalign.training.trainer import train
from helpers import TINY_ARGS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
MODEL = "adapter/" + finetune.MODEL_WEIGHTS
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# tiny runs: 3 steps, a checkpoint every step, EMA, per-call gradient checkpointing (recomputed inside the
# reference context), two evaluation chains
RUN = dict(finetune="full", steps=3, eval_every=3, grid_every=3, eval_size=2, final_eval_size=0, checkpoint_every=1,
           keep_checkpoints=2, lr=1e-3, ema_decay=0.8, grad_checkpointing=True)
RUN_ARGS = ["--finetune", "full", "--steps", "3", "--eval-every", "3", "--grid-every", "3", "--eval-size", "2",
            "--final-eval-size", "0", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--lr", "1e-3",
            "--ema-decay", "0.8", "--grad-checkpointing", "True"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rank_child(rank, port, cfg, resume, log, nan_on=None):
    """One of 2 gloo ranks, forked from the test process (the imports and the gold classifiers are inherited).
    nan_on = (rank, call): that rank's training reward is NaN on that gradient-enabled call."""
    if nan_on is not None and nan_on[0] == rank:
        from cmalign.training import trainer as trainer_mod

        original, calls = trainer_mod.build_weighted, [0]

        def poisoned(*a, **k):
            inner = original(*a, **k)

            def reward(images, prompts):
                value = inner(images, prompts)
                if torch.is_grad_enabled():
                    calls[0] += 1
                    if calls[0] == nan_on[1]:
                        return value * float("nan")
                return value

            return trainer_mod.as_training_reward(reward)

        trainer_mod.build_weighted = poisoned
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate.state import AcceleratorState, GradientState, PartialState

    # accelerate's state is a process-wide singleton: the parent's single-process state must not leak into the ranks
    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)  # not pytest's capture
    try:
        train(cfg, progress=False, resume=resume)
        code = 0
    except UserError as exc:
        print(f"cmalign: error: {exc}", flush=True)
        code = 2
    os._exit(code)


def fork_ranks(cfg, log: Path, resume=None, nan_on=None):
    import multiprocessing

    port = free_port()
    procs = [multiprocessing.get_context("fork").Process(target=_rank_child, args=(r, port, cfg, resume, str(log), nan_on))
             for r in range(2)]
    for p in procs:
        p.start()
    return procs


@pytest.mark.xdist_group("multiprocess")
def test_fsdp2_two_ranks_match_one_process_survive_sigkill_and_reshard(tmp_path):
    # 1 process, global batch 8
    one = train(tiny_config(output_dir=str(tmp_path / "one"), batch_size=8, **RUN), progress=False).run_dir
    # the shipped FSDP2 config, 2 CPU ranks x batch 4 (its GPU settings overridden: fp32, 2 processes, --device cpu)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp_full_finetune.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "cmalign", "train", *TINY_ARGS, *RUN_ARGS, "--batch-size", "4", "--device", "cpu", "--output-dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x batch 4 per process = global batch 8" in proc.stdout
    assert "network parameters identical across 2 ranks" in proc.stdout  # the gathered full weights, compared
    a, b = load_file(str(one / MODEL)), load_file(str(two / MODEL))
    assert a.keys() == b.keys() and len(a) > 50  # every weight of the UNet, not an adapter
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    base = load_file(str(two / "checkpoints" / "step_000003" / "state.safetensors"))
    assert not any(k.startswith("param.") for k in base), "the weights live in the DCP shards"
    shards = list((two / "checkpoints" / "step_000003" / finetune.SHARDS).glob("*.distcp"))
    assert len(shards) == 2, "each rank wrote its own shards"

    # SIGKILL both ranks after the step-2 checkpoint, resume on 2 ranks: the uninterrupted run, bit for bit
    run, log = tmp_path / "killed", tmp_path / "log.txt"
    cfg = tiny_config(output_dir=str(run), batch_size=4, **RUN)
    procs = fork_ranks(cfg, log)
    deadline = time.time() + 120
    while time.time() < deadline and all(p.is_alive() for p in procs) and not list_checkpoints(run / "checkpoints")[1:]:
        time.sleep(0.01)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(60)
    done = [c.name for c in list_checkpoints(run / "checkpoints")]
    assert done and done[-1] in ("step_000002", "step_000003"), (done, log.read_text()[-2000:])
    if done[-1] == "step_000003":  # the kill came too late for a resume to matter: start from step 1's
        os.rename(run / "checkpoints" / "step_000003", run / "checkpoints" / ".old_step_000003")
    procs = fork_ranks(cfg, log, resume="latest")
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0], log.read_text()[-3000:]
    assert (run / MODEL).read_bytes() == (two / MODEL).read_bytes(), "bit-identical to the uninterrupted run"
    got, want = rows_of(run), rows_of(two)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    # the training metrics are the same; gold-based ones not compared: the launched ranks fit their own gold
    # classifiers (sklearn, other BLAS threads), the forked ones use the test process's
    keys = ("reward", "divergence", "loss", "grad_norm", "eval_reward", "samples", "skipped", "bad_steps")
    for x, y in zip(got, want):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}, x["step"]

    # the 2-rank checkpoint loads into ONE process (DCP reshards): its EMA is the exported network
    from cmalign.training.build import build_world

    world = build_world(cfg, lora=False)
    full = finetune.attach(world, cfg, 1)
    assert full is not None and not full.sharded
    params = world.trainable_parameters()
    from cmalign.training.checkpoint import EMA

    ema, opt, gen = EMA(params, 0.8), torch.optim.AdamW(params, lr=1e-3), torch.Generator()
    path = two / "checkpoints" / "step_000003"
    tensors, meta = read_checkpoint(path)
    finetune.restore(path, tensors, meta, world.network, opt, ema, gen)
    names = [n for n, p in world.network.named_parameters()]
    for n, s in zip(names, ema.shadow):
        assert torch.equal(s, b[n]), n
    assert int(opt.state_dict()["state"][0]["step"]) == 3, "AdamW's step counts came back"

    # the export is a diffusers model folder: the stock loader + the world's chain give `cmalign sample --run`'s images
    from diffusers import UNet2DModel

    from cmalign.training.evaluation import generate_seeded

    out = tmp_path / "samples"
    assert cli.main(["sample", "--run", str(one), "--prompts", "a handwritten seven", "--num-per-prompt", "3",
                     "--seed", "5", "--out", str(out)]) == 0
    import numpy as np

    ours = np.load(out / "samples.npz")["images"]
    stock = build_world(cfg, lora=False)
    stock.network = UNet2DModel.from_pretrained(str(one / "adapter")).eval()
    theirs = generate_seeded(stock, ["a handwritten seven"] * 3, [5, 6, 7], 4).numpy()  # image i: seed 5 + i
    assert np.allclose(ours, theirs, atol=1e-6), np.abs(ours - theirs).max()  # float round-off of another load path
    base = generate_seeded(build_world(cfg, lora=False), ["a handwritten seven"] * 3, [5, 6, 7], 4).numpy()
    assert not np.array_equal(ours, base), "the tuned network differs from the base"


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_both(tmp_path):
    """FSDP reduces the gradients itself; the ranks must still agree to skip: rank 1's reward is NaN on its
    second update only, both ranks skip that update (no hang in the reduce-scatter) and end identical."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    cfg = tiny_config(output_dir=str(run), batch_size=2, **{**RUN, "checkpoint_every": 0, "ema_decay": None,
                                                            "grad_checkpointing": False})
    procs = fork_ranks(cfg, log, nan_on=(1, 2))
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0], log.read_text()[-3000:]
    assert "network parameters identical across 2 ranks" in log.read_text()
    rows = {r["step"]: r for r in rows_of(run)}
    assert [s for s in (1, 2, 3) if rows[s]["skipped"]] == [2] and rows[3]["bad_steps"] == 1
    assert rows[3]["grad_norm"] is not None and rows[2]["grad_norm"] is None


def test_full_finetune_refusals(monkeypatch):
    with pytest.raises(UserError, match="stacked one would stay frozen"):
        validate(tiny_config(world="lcm", finetune="full", **{"lcm.lora": "x"}, **{"lcm.lora_mode": "stack"}), check_rewards=False)
    with pytest.raises(UserError, match="reference_offload"):
        validate(tiny_config(reference_offload=True))
    with pytest.raises(UserError, match="divergence_fraction"):
        validate(tiny_config(finetune="full", divergence_fraction=0.5))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="pass --finetune full"):
        validate(tiny_config())
    validate(tiny_config(finetune="full"))


def test_every_shipped_launcher_config_is_accelerates_and_launched_by_a_test():
    """multi_gpu_ddp.yaml needs GPUs: it is parsed and validated by accelerate's own config loader here;
    cpu_2proc.yaml is launched by test_reliability's 2-rank test, fsdp_full_finetune.yaml by the test above."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    names = sorted(p.name for p in CONFIGS.iterdir())
    assert names == ["cpu_2proc.yaml", "fsdp_full_finetune.yaml", "multi_gpu_ddp.yaml", "multi_node_ddp.yaml"]
    nodes = load_config_from_file(str(CONFIGS / "multi_node_ddp.yaml"))  # its torchrun twin: test_guarantees_matrix
    assert nodes.distributed_type == DistributedType.MULTI_GPU and nodes.num_machines == 2 and nodes.rdzv_backend == "c10d"
    ddp = load_config_from_file(str(CONFIGS / "multi_gpu_ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes == 8 and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp_full_finetune.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    cpu = load_config_from_file(str(CONFIGS / "cpu_2proc.yaml"))
    assert cpu.distributed_type == DistributedType.MULTI_GPU and cpu.num_processes == 2
    assert '"--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")' in (ROOT / "tests" / "test_reliability.py").read_text()


def test_lcm_full_finetune_export_runs_in_the_stock_pipeline(tmp_path):
    """lcm: the frozen copy is the reference; the exported UNet folder, passed to a stock
    LatentConsistencyModelPipeline, reproduces our chain's images."""
    from diffusers import UNet2DConditionModel

    from lcm_fixtures import stock_pipeline, tiny_components, tiny_world
    from test_lcm_world import lcm_config, rollout, stock_call

    world = tiny_world(tmp_path / "ours", lora_rank=None)
    cfg = lcm_config(finetune="full")
    full = finetune.attach(world, cfg, 1)
    assert world.trainable_parameters() and len(world.trainable_parameters()) == len(list(world.network.parameters()))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: every weight moves
        for p in world.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (p.abs().mean() + 1e-3))
    finetune.save_trained(world, tmp_path / "adapter", cfg)
    with torch.no_grad():
        images = world.decode(rollout(world, 2).x0).clamp(0, 1)
        with world.reference_policy():
            base = world.decode(rollout(world, 2).x0).clamp(0, 1)
    assert full is not None and (images - base).abs().max() > 1e-3, "the reference is the frozen initial copy"
    components = tiny_components(tmp_path / "stock")
    components["unet"] = UNet2DConditionModel.from_pretrained(str(tmp_path / "adapter"))
    pipe = stock_pipeline(components)
    assert (images - stock_call(pipe, 2, world.guidance_scale, "pt")).abs().max() < 1e-5
