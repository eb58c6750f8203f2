"""Every guarantee on every world: the lcm families we ship (SD-1.5 LCM, SD-1.5 + LCM-LoRA, LCM-SDXL, TCD,
PixArt-LCM; tiny random weights in their publishers' layouts, lcm_fixtures.save_family) and the digits world.

| guarantee | digits | each lcm family |
| --- | --- | --- |
| SIGKILL (mid-checkpoint) + resume, SIGTERM + resume: bit-identical | test_reliability.py | test_kill_term_resume_is_bit_identical |
| 2 ranks = 1 process, LoRA on DDP's reducer | test_reliability.py | test_two_ranks_equal_one_process_and_load_in_the_stock_pipeline |
| 2 ranks = 1 process, full fine-tuning on FSDP2 | test_full_finetune.py | (the same test) |
| multi-rank export loads whole in the stock pipeline and reproduces our samples | (no stock pipeline) | (the same test) |
| 2 nodes x 1 process (torchrun, c10d rendezvous) = 1 process | test_two_nodes_equal_one_process | (the same code path) |
| prompts.json, --eval-prompt-file, held-out fraction | test_prompts_* | test_prompts_* |

Kept cheap (docs/guarantees.md): 3 steps of batch 2 at 32 px; one uninterrupted run per family serves the resume
and the rank comparisons; the 2-rank runs of every family (LoRA and full fine-tuning) share ONE 2-process launch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmalign.cli import main
from cmalign.training.checkpoint import list_checkpoints
from helpers import TINY_ARGS
from lcm_fixtures import LCM_FAMILIES, RESOLUTION, family_stock_pipeline, save_family, tiny_clip
from test_reliability import ADAPTER, ENV, ROOT, fork_cli, free_port, rows_of

PROMPTS = ["a red cat", "a dog", "a cow"]
STEPS = 3
SAMPLE = ["a red cat", "a dog"]
# Reward and divergence scaled far down so that every AdamW update is in its linear regime (|g| << eps): 2 ranks and
# 1 process then differ by float rounding only (~1e-7). At normal scale AdamW's g / (sqrt(v) + eps) amplifies the
# ranks' different summation order near eps and the adapters differ by up to 0.03 after a few steps, which would hide
# a wrong gradient average (a sum, one rank's) as well as it hides rounding. Resume is bit-exact at any scale.
SCALED = ("--reward-scale", "1e-6", "--beta", "1e-6", "--lr", "0.05")

# full fine-tuning: the ranks' rounding differences, amplified by lr / eps in AdamW's linear regime, grow with the
# step (at lr 0.05: 1.5e-5 on SD-1.5 LCM; at 0.005: 2.9e-5 on SD-1.5 + fused LCM-LoRA), so full runs take 5e-4
FULL = ("--finetune", "full", "--lr", "5e-4")


def lcm_args(model: Path, flags: list[str], clip: Path, run: Path, *extra: str) -> list[str]:
    lora = [] if "full" in extra else ["--lora-rank", "4", "--lora-alpha", "4"]  # full fine-tuning has no adapter
    return ["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", str(RESOLUTION), *flags,
            "--prompts", *PROMPTS, "--eval-prompts", "a bird", "--reward-weights", "clip_score=1.0",
            "--reward-paths", f"clip_score={clip}", *lora, "--num-steps", "2",
            "--steps", str(STEPS), "--eval-every", "2", "--eval-size", "1", "--grid-every", "100", "--final-eval-size", "0",
            "--keep-checkpoints", "5", "--report-to", "none", "--device", "cpu", "--threads", "1",
            "--mixed-precision", "no", *SCALED, "--output-dir", str(run), *extra]


_FAMILIES: dict = {}


def family(name: str, tmp_path_factory) -> dict:
    """The family's folder, flags, reward and its uninterrupted 1-process runs (LoRA, and full fine-tuning when
    asked for), built once per test process."""
    if name not in _FAMILIES:
        root = tmp_path_factory.mktemp(name)
        model, flags = save_family(root, name)
        clip, _ = tiny_clip(root / "clip")
        _FAMILIES[name] = dict(root=root, model=model, flags=flags, clip=clip, runs={})
    return _FAMILIES[name]


def reference(fam: dict, kind: str) -> Path:
    """The uninterrupted 1-process run of batch 2 (kind "lora" or "full")."""
    if kind not in fam["runs"]:
        run = fam["root"] / f"ref-{kind}"
        extra = FULL if kind == "full" else ()
        assert main(lcm_args(fam["model"], fam["flags"], fam["clip"], run, "--batch-size", "2", "--checkpoint-every", "1",
                             *extra)) == 0
        fam["runs"][kind] = run
    return fam["runs"][kind]


def metrics_without_clock(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows_of(run)]


def ckpt_steps(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run / "checkpoints")]


# --- SIGKILL mid-checkpoint, SIGTERM at the current step, resume: bit-identical ----------------------------
@pytest.mark.parametrize("name", LCM_FAMILIES)
def test_kill_term_resume_is_bit_identical(name, tmp_path, tmp_path_factory):
    """SIGKILL inside a checkpoint (half-written state, or after the rename before pruning: a random phase and
    step), then the same command resumed and stopped by SIGTERM at a random moment (it must checkpoint the step it
    stopped at), then `--resume latest`: adapter bytes and metrics equal the uninterrupted run's."""
    fam = family(name, tmp_path_factory)
    want = reference(fam, "lora")
    rng = random.Random(LCM_FAMILIES.index(name))
    run, log = tmp_path / "run", tmp_path / "log.txt"
    args = lcm_args(fam["model"], fam["flags"], fam["clip"], run, "--batch-size", "2")
    kill = (rng.choice(["write", "prune"]), 1)
    proc = fork_cli([*args, "--checkpoint-every", "1"], log, kill=kill)
    proc.join(240)
    assert proc.exitcode == -signal.SIGKILL, log.read_text()[-3000:]
    assert ckpt_steps(run) == ([] if kill[0] == "write" else [1])
    # resumed (or started again: no complete checkpoint) with no periodic checkpoints: SIGTERM's is the only one
    done = max(ckpt_steps(run), default=0)
    proc = fork_cli([*args, "--checkpoint-every", "0", "--resume", "latest"], log)
    deadline, starts = time.time() + 240, log.read_text().count("global batch")
    while proc.is_alive() and time.time() < deadline and log.read_text().count("global batch") == starts:
        time.sleep(0.005)  # until the resumed run has truncated the killed one's metrics past its checkpoint
    while proc.is_alive() and time.time() < deadline and not (
            (run / "metrics.jsonl").is_file() and any(r["step"] > done for r in rows_of(run))):
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.2))
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(240)
    text = log.read_text()
    assert proc.exitcode == 128 + signal.SIGTERM, text[-3000:]
    stopped = rows_of(run)[-1]["step"]
    assert done < stopped <= STEPS and ckpt_steps(run)[-1] == stopped, (done, stopped, ckpt_steps(run))
    assert f"stopped by SIGTERM at step {stopped}" in text
    proc = fork_cli([*args, "--checkpoint-every", "1", "--resume", "latest"], log)
    proc.join(240)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (want / "adapter" / "adapter_model.safetensors").read_bytes()
    assert metrics_without_clock(run) == metrics_without_clock(want)
    assert [r["step"] for r in rows_of(run)] == list(range(STEPS + 1))


# --- 2 ranks = 1 process (LoRA on DDP's reducer; full fine-tuning on FSDP2); the export in the stock pipeline ----
HARNESS = """
import json, os, sys
import torch
from cmalign.cli import main
from cmalign.training import distributed
# every family's runs in one 2-process launch (a launch costs a minute of imports and set-up on 2 busy cores): the
# process group stays up between runs (teardown meets the other rank only) and is torn down after the last one
finish = distributed.teardown
distributed.teardown = lambda n: torch.distributed.barrier() if distributed.dist_on(n) else None
codes = [main(args) for args in json.load(open(sys.argv[1]))]
finish(2)
if os.environ.get("RANK") == "0":
    print("codes", codes, flush=True)
distributed.end_process(max(codes))
"""


def launch_two_ranks(runs: list[list[str]], folder: Path) -> subprocess.CompletedProcess:
    (folder / "runs.json").write_text(json.dumps(runs))
    (folder / "harness.py").write_text(HARNESS)
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(folder / "harness.py"), str(folder / "runs.json")]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "HF_HUB_OFFLINE": "1"}, timeout=900)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.xdist_group("multiprocess")
def test_two_ranks_equal_one_process_and_load_in_the_stock_pipeline(tmp_path, tmp_path_factory):
    """For every lcm family: LoRA through DDP's reducer and full fine-tuning on FSDP2, 2 ranks of batch 1 against
    1 process of batch 2, within 1e-5 on every exported tensor; the LoRA exported after multi-rank training (and
    its checkpoints' export check) loads whole in the family's stock pipeline and reproduces `cmalign sample`."""
    fams = {name: family(name, tmp_path_factory) for name in LCM_FAMILIES}
    runs, where = [], {}
    for name, fam in fams.items():
        # the LoRA runs also score a final evaluation on the 2 ranks (the DDP-wrapped network, each rank's share)
        for kind, extra in (("lora", ("--checkpoint-every", "2", "--final-eval-size", "2")),
                            ("full", (*FULL, "--checkpoint-every", "0"))):
            where[name, kind] = tmp_path / f"{name}-{kind}"
            runs.append(lcm_args(fam["model"], fam["flags"], fam["clip"], where[name, kind], "--batch-size", "1", *extra))
    proc = launch_two_ranks(runs, tmp_path)
    assert proc.returncode == 0 and "codes [" + ", ".join(["0"] * len(runs)) + "]" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:])
    assert proc.stdout.count("parameters identical across 2 ranks") == len(runs)
    failures = []
    for name, fam in fams.items():
        two = load_file(where[name, "lora"] / "adapter" / "adapter_model.safetensors")
        one = load_file(reference(fam, "lora") / "adapter" / "adapter_model.safetensors")
        if not max_diff(one, two) < 1e-5 or not max(v.abs().max().item() for k, v in two.items() if ".lora_B." in k) > 1e-3:
            failures.append((name, "lora", max_diff(one, two)))
        assert (where[name, "lora"] / "checkpoints" / "step_000002").is_dir()  # a multi-rank checkpoint passed its export check
        assert json.loads((where[name, "lora"] / "final_eval.json").read_text())["n"] == 2  # scored on both ranks
        two = load_file(where[name, "full"] / "adapter" / "diffusion_pytorch_model.safetensors")
        one = load_file(reference(fam, "full") / "adapter" / "diffusion_pytorch_model.safetensors")
        if not max_diff(one, two) < 1e-5:
            failures.append((name, "full", max_diff(one, two)))
        failures += stock_failures(name, fam, where[name, "lora"], tmp_path / f"{name}-samples")
    assert not failures, failures


def stock_failures(name: str, fam: dict, run: Path, out: Path) -> list:
    """The family's stock pipeline with the multi-rank run's export: every tensor lands, the samples are ours."""
    assert main(["sample", "--run", str(run), "--prompts", *SAMPLE, "--num-per-prompt", "1", "--seed", "5",
                 "--out", str(out)]) == 0
    ours = torch.from_numpy(np.load(out / "samples.npz")["images"])
    pipe, kwargs = family_stock_pipeline(fam["model"], name, fam["flags"], run / "adapter")
    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    network = pipe.transformer if name == "pixart-lcm" else pipe.unet
    landed = sum(1 for n, _ in network.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    guidance = float(fam["flags"][fam["flags"].index("--lcm.guidance-scale") + 1])
    with torch.no_grad():
        stock = pipe(SAMPLE, num_inference_steps=2, guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                     generator=[torch.Generator().manual_seed(5 + i) for i in range(len(SAMPLE))], output_type="pt",
                     **kwargs).images  # `cmalign sample` seeds each image: seed + index
    diff = (ours - stock).abs().max().item()
    return [] if landed == len(exported) and diff < 1e-5 else [(name, "stock", landed, len(exported), diff)]


# --- multi-node: 2 "nodes" x 1 process on loopback (torchrun, c10d rendezvous) = 1 process ------------------
@pytest.mark.xdist_group("multiprocess")
def test_two_nodes_equal_one_process(tmp_path):
    """docs/scaling.md's 2-node torchrun command, both nodes on 127.0.0.1: node 0 hosts the c10d rendezvous, rank 0
    writes the run directory (which must be on storage both nodes see)."""
    # 8 steps: the default regulariser's importance draws start once every step has been measured
    common = ["--batch-size", "4", "--steps", "8", "--eval-every", "8", "--grid-every", "8", "--final-eval-size", "0",
              "--checkpoint-every", "0", *SCALED, "--device", "cpu", "--report-to", "none"]  # SCALED: docs/guarantees.md
    one = tmp_path / "one"
    assert main(["train", *TINY_ARGS, *common, "--batch-size", "8", "--output-dir", str(one)]) == 0
    two, port = tmp_path / "two", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "cmalign-test", "-m", "cmalign", "train", *TINY_ARGS, *common,
                               "--output-dir", str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    assert "2 process(es) x batch 4 per process = global batch 8" in outs[0][0] + outs[1][0]
    a, b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))
    assert max_diff(a, b) < 2e-5 and any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)


# --- prompts the user can trust ----------------------------------------------------------------------------
def run_prompts(run: Path) -> dict:
    return json.loads((run / "prompts.json").read_text())


def test_prompts_eval_prompt_file_is_held_out_and_recorded(tmp_path):
    """--eval-prompt-file F: prompts.json has exactly F's prompts under "eval", none of them under "train";
    report.md names them and says they are held out."""
    file = tmp_path / "eval.txt"
    file.write_text("# held out\na handwritten seven\na handwritten one\n")
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "1", "--eval-size", "4", "--final-eval-size", "4", "--report-to", "none",
                 "--eval-prompt-file", str(file), "--output-dir", str(run)]) == 0
    got = run_prompts(run)
    assert got["eval"] == ["a handwritten seven", "a handwritten one"] and got["held_out"] is True
    assert not set(got["eval"]) & set(got["train"]) and len(got["train"]) == 8
    report = (run / "report.md").read_text()
    assert "`a handwritten seven`; `a handwritten one`" in report and "held out: none of them trains" in report


def test_prompts_heldout_fraction_of_a_prompt_file_applies_seeded_and_stated(tmp_path):
    """lcm: lcm.heldout_fraction splits a --prompt-file (seeded: the same split every time); digits, whose prompts are
    the classes, evaluates on its training prompts and says so."""
    from cmalign.config import TrainConfig, with_changes
    from cmalign.prompts import prompt_split

    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")

    class World:
        name, heldout_fraction = "lcm", 0.3

        def check_prompts(self, prompts):
            pass

    cfg = with_changes(TrainConfig(), prompt_file=str(file))
    split = prompt_split(cfg, World())
    assert len(split.eval) == 3 and len(split.train) == 7 and split.held_out and "heldout_fraction 0.3" in split.how
    assert prompt_split(cfg, World()) == split and sorted(split.train + split.eval) == sorted(f"prompt {i}" for i in range(10))
    World.heldout_fraction = 0.0
    plain = prompt_split(cfg, World())
    assert plain.eval == plain.train and not plain.held_out
    digits = file.with_name("digits.txt")
    digits.write_text("a handwritten seven\na handwritten one\n")
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "1", "--eval-size", "2", "--final-eval-size", "0", "--report-to", "none",
                 "--prompt-file", str(digits), "--output-dir", str(run)]) == 0
    assert run_prompts(run) == {"train": ["a handwritten seven", "a handwritten one"],
                                "eval": ["a handwritten seven", "a handwritten one"], "held_out": False,
                                "how": f"training prompts from prompt file {digits}; evaluation on the same prompts"}
