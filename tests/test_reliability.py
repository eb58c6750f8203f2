"""Scale-out, exact resume, fault handling and bad input (issue: scale-out on accelerate)."""

from __future__ import annotations

import json
import os
import random
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
from cmalign import trainer as trainer_mod
from cmalign.checkpoint import list_checkpoints, read_checkpoint
from cmalign.errors import UserError
from cmalign.trainer import train
from helpers import TINY_ARGS, tiny_config

ADAPTER = "adapter/adapter.safetensors"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, message: str) -> bool:
    # Progress bars (a first-time base-model build, the training bar) share stderr; skip them.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    return len(lines) == 1 and lines[0].startswith("cmalign: error:") and message in lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- distributed ------------------------------------------------------------------------------------
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = dict(steps=3, eval_every=3, grid_every=3, final_eval_size=0, checkpoint_every=0, lr=1e-2)
    one = train(tiny_config(output_dir=str(tmp_path / "one"), batch_size=8, **common), progress=False)
    two = tmp_path / "two"
    # `--cpu` would make accelerate use its single-process launcher (multi-CPU needs mpirun); the
    # torchrun-based launcher with --device cpu gives 2 CPU ranks on gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "cmalign", "train", *TINY_ARGS,
           "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--grid-every", "3", "--final-eval-size", "0",
           "--checkpoint-every", "0", "--lr", "1e-2", "--device", "cpu", "--output-dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x batch 4 per process = global batch 8" in proc.stdout
    assert "adapter parameters identical across 2 ranks" in proc.stdout
    a, b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5), (k, (a[k] - b[k]).abs().max())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in b.items() if "lora_B" in k), "the adapter trained"
    r1, r2 = rows_of(one), rows_of(two)
    assert [r["step"] for r in r2] == [0, 1, 2, 3] and r2[-1]["samples"] == 24
    for x, y in zip(r1[1:], r2[1:]):  # metrics are the mean over ranks = the global batch's
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-4, abs=1e-6)


def _child(args):
    import io

    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    os._exit(cli.main(args))


def fork_cli(args):
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args,))
    proc.start()
    return proc


# --- exact resume ------------------------------------------------------------------------------------
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path):
    steps = 8
    common = ["--steps", str(steps), "--eval-every", "4", "--grid-every", "4", "--final-eval-size", "0",
              "--checkpoint-every", "1", "--keep-checkpoints", "2", "--lr", "1e-2", "--ema-decay", "0.8"]
    ref = train(tiny_config(output_dir=str(tmp_path / "ref"), steps=steps, eval_every=4, grid_every=4, final_eval_size=0,
                            checkpoint_every=1, keep_checkpoints=2, lr=1e-2, ema_decay=0.8), progress=False)
    run = tmp_path / "killed"
    base = ["train", *TINY_ARGS, *common, "--output-dir", str(run)]
    rng = random.Random(1234)
    kills = 0
    for attempt in range(3):
        target = rng.randint(1 + 2 * attempt, 2 + 2 * attempt)
        args = base + (["--resume", "latest"] if list_checkpoints(run / "checkpoints") else
                       (["--overwrite"] if run.exists() else []))
        proc = fork_cli(args)  # a forked child: no 6 s of imports per start
        deadline = time.time() + 120
        while proc.is_alive() and time.time() < deadline:
            ckpts = list_checkpoints(run / "checkpoints")
            if ckpts and int(ckpts[-1].name[5:]) >= target:
                time.sleep(rng.uniform(0, 0.3))  # land anywhere: mid-step, mid-eval, mid-checkpoint
                break
            time.sleep(0.02)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
    assert kills >= 2, "the runs should have been killed before finishing"
    proc = fork_cli(base + ["--resume", "latest"])
    proc.join(180)
    assert proc.exitcode == 0
    assert (run / ADAPTER).read_bytes() == (ref / ADAPTER).read_bytes(), "the resumed adapter must be bit-identical"
    got, want = rows_of(run), rows_of(ref)
    assert [r["step"] for r in got] == list(range(steps + 1)), "no duplicate or missing metrics rows"
    for g, w in zip(got, want):
        assert g.get("reward") == w.get("reward") and g.get("eval_reward") == w.get("eval_reward")
    assert len(list_checkpoints(run / "checkpoints")) == 2, "keep_checkpoints keeps the newest two"
    assert not list((run / "checkpoints").glob(".tmp_*")), "no half-written checkpoint left after a clean finish"


# --- faults ------------------------------------------------------------------------------------------
class NanReward:
    """Wraps the training reward: NaN on the chosen training calls (gradient-enabled ones)."""

    def __init__(self, inner, bad_calls):
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images, prompts):
        value = self.inner(images, prompts)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.bad_calls(self.calls):
                return value * float("nan")
        return value


def patch_reward(monkeypatch, bad_calls):
    original = trainer_mod.build_weighted
    monkeypatch.setattr(trainer_mod, "build_weighted", lambda *a, **k: NanReward(original(*a, **k), bad_calls))


def test_nan_reward_steps_are_skipped_logged_and_counted(tmp_path, monkeypatch):
    patch_reward(monkeypatch, lambda call: call in (2, 4))
    run = train(tiny_config(output_dir=str(tmp_path / "run"), steps=5, final_eval_size=0, checkpoint_every=1,
                            ema_decay=0.5), progress=False)
    rows = {r["step"]: r for r in rows_of(run)}
    assert [s for s in range(1, 6) if rows[s]["skipped"]] == [2, 4]
    assert rows[2]["reward"] is None and rows[5]["bad_steps"] == 2 and rows[5]["grad_norm"] is not None
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step_000003", "step_000005"], "no checkpoint is written at a skipped step"
    assert all(torch.isfinite(v).all() for v in load_file(str(run / ADAPTER)).values())


def test_too_many_bad_steps_in_a_row_stop_with_one_line_and_checkpoint_intact(tmp_path, monkeypatch, capsys):
    patch_reward(monkeypatch, lambda call: call >= 3)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "20", "--checkpoint-every", "1",
                           "--max-bad-steps", "3", "--final-eval-size", "0", "--output-dir", str(run))
    # The progress bar shares stderr during the run; the error is its one last line, no traceback.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "rocm digits" not in line]
    assert code == 2 and len(lines) == 1 and "3 updates in a row were skipped" in lines[0], err
    assert "Traceback" not in err
    assert "step_000002" in err
    last = list_checkpoints(run / "checkpoints")[-1]
    assert last.name == "step_000002"
    tensors, meta = read_checkpoint(last)  # intact and readable
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("param."))
    assert [r["step"] for r in rows_of(run)][-1] == 5


def test_reward_of_wrong_shape_is_one_line(tmp_path, monkeypatch, capsys):
    from cmalign.rewards import registry

    class Bad:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, images, prompts):
            return self.inner(images, prompts)[:, None].repeat(1, 2)

    weighted = registry.WeightedReward if hasattr(registry, "WeightedReward") else None
    if weighted is None:
        pytest.skip("no WeightedReward")
    original = trainer_mod.build_weighted

    def build(*a, **k):
        w = original(*a, **k)
        for name in list(w.rewards):
            w.rewards[name] = Bad(w.rewards[name])
        return w

    monkeypatch.setattr(trainer_mod, "build_weighted", build)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0",
                           "--output-dir", str(tmp_path / "run"))
    assert code == 2 and one_error_line(err, "returned shape"), err


# --- bad input ----------------------------------------------------------------------------------------
def test_non_differentiable_reward_with_rocm_names_the_alternatives():
    from cmalign.methods.rocm import Rocm

    class Stub:
        name, differentiable = "jpeg_compressibility", False

    with pytest.raises(UserError, match="not differentiable.*(rlcm|ddpo)"):
        Rocm(tiny_config(), world=None, reward=Stub())


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    train(tiny_config(output_dir=str(run), steps=2, final_eval_size=0, checkpoint_every=1), progress=False)
    return run


def snapshot(run: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def test_resume_path_that_is_not_a_checkpoint(checkpointed_run, tmp_path, capsys):
    before = snapshot(checkpointed_run)
    for bad in (tmp_path, checkpointed_run / "adapter"):
        code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0",
                               "--checkpoint-every", "1", "--output-dir", str(checkpointed_run), "--resume", str(bad))
        assert code == 2 and one_error_line(err, "not a checkpoint"), err
    assert snapshot(checkpointed_run) == before


def test_truncated_checkpoint_is_refused_and_left_alone(checkpointed_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(checkpointed_run, run)
    last = list_checkpoints(run / "checkpoints")[-1]
    weights = last / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0", "--checkpoint-every", "1",
                           "--output-dir", str(run), "--resume", str(last))
    assert code == 2 and one_error_line(err, "unreadable"), err
    assert snapshot(run) == before


def test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite(checkpointed_run, capsys):
    before = snapshot(checkpointed_run)
    args = ["train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0", "--checkpoint-every", "1",
            "--output-dir", str(checkpointed_run)]
    code, _, err = run_cli(capsys, *args, "--beta", "1.0")
    assert code == 2 and one_error_line(err, "different config (beta)"), err
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_error_line(err, "already holds a run"), err
    code, _, err = run_cli(capsys, *args, "--beta", "1.0", "--resume", "latest")
    assert code == 2 and one_error_line(err, "different config (beta)"), err
    assert snapshot(checkpointed_run) == before


def test_resume_latest_without_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(output_dir=str(run), steps=1, final_eval_size=0, checkpoint_every=0), progress=False)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "1", "--final-eval-size", "0", "--checkpoint-every", "0",
                           "--output-dir", str(run), "--resume", "latest")
    assert code == 2 and one_error_line(err, "holds no checkpoint"), err


@pytest.mark.parametrize("args,message", [
    (["--checkpoint-every", "-1"], "checkpoint_every"),
    (["--keep-checkpoints", "0"], "keep_checkpoints"),
    (["--ema-decay", "1.5"], "ema_decay"),
    (["--max-bad-steps", "0"], "max_bad_steps"),
    (["--resume"], "--resume needs a value"),
])
def test_bad_reliability_settings(args, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--output-dir", str(tmp_path / "run"), *args)
    assert code == 2 and one_error_line(err, message), err
    assert not (tmp_path / "run").exists()


def test_no_pickle_loading_or_remote_code_in_the_package():
    src = Path(__file__).parents[1] / "src" / "cmalign"
    text = {p: p.read_text() for p in src.rglob("*.py")}
    assert not [p for p, t in text.items() if "trust_remote_code=True" in t]
    assert not [p for p, t in text.items() if "yaml.load(" in t or "pickle.load" in t]
    unpickling_load = "torch" + ".load("  # spelled in two parts so this line is not itself a match
    for p, t in text.items():
        for line in t.splitlines():
            if unpickling_load in line:
                assert "weights_only=True" in line, (p, line)


def test_a_cache_entry_published_by_another_process_first_is_kept(tmp_path, monkeypatch):
    """Two workers building the same cache entry: the loser's rename fails on the winner's folder,
    which stays as it is; the loser's staging folder is removed."""
    from cmalign import cache

    final = tmp_path / "entry"
    tmp = cache.staging_dir(final)
    (tmp / "weights").write_text("mine")

    def rival_wins(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "weights").write_text("theirs")
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(os, "replace", rival_wins)
    cache.publish_dir(tmp, final)
    assert (final / "weights").read_text() == "theirs" and not tmp.exists()
