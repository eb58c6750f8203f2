"""Scale-out, exact resume, fault handling and bad input (issue: scale-out on accelerate)."""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
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
from cmalign.training import trainer as trainer_mod
from cmalign.training.checkpoint import list_checkpoints, read_checkpoint
from cmalign.errors import UserError
from cmalign.experiments.common import only_owned_sections
from cmalign.training.trainer import train
from helpers import TINY_ARGS, tiny_config

ADAPTER = "adapter/adapter.safetensors"
ROOT = Path(__file__).resolve().parents[1]
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
@pytest.mark.xdist_group("multiprocess")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # the linear-Adam scale of docs/guarantees.md: |g| << eps, so the ranks' summation order is not amplified
    common = dict(steps=3, eval_every=3, grid_every=3, final_eval_size=0, checkpoint_every=0, lr=0.05, reward_scale=1e-6, beta=1e-6)
    one = train(tiny_config(output_dir=str(tmp_path / "one"), batch_size=8, **common), progress=False)
    two = tmp_path / "two"
    # `--cpu` would make accelerate use its single-process launcher (multi-CPU needs mpirun); the
    # torchrun-based launcher with --device cpu gives 2 CPU ranks on gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),  # the shipped 2-CPU-rank config
           "--main_process_port", str(free_port()), "-m", "cmalign", "train", *TINY_ARGS,
           "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--grid-every", "3", "--final-eval-size", "0",
           "--checkpoint-every", "0", "--lr", "0.05", "--reward-scale", "1e-6", "--beta", "1e-6", "--device", "cpu",
           "--output-dir", str(two)]
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


# --- exact resume: SIGKILL and SIGTERM for every method -----------------------------------------------
# Tiny runs: 3 steps of batch 2 over two prompts, so that the policy-gradient methods' per-prompt reward
# buffers (stat_min_count 2) are in use before the first kill: a resume that lost them would diverge.
STEPS = 3
PROMPTS = ["a handwritten seven", "a handwritten one"]


def resume_config(method: str, run: Path, **changes):
    base = dict(method=method, output_dir=str(run), steps=STEPS, batch_size=2, eval_every=2, grid_every=4, eval_size=2,
                final_eval_size=0, checkpoint_every=1, keep_checkpoints=2, lr=1e-2, ema_decay=0.8, prompts=PROMPTS,
                **{"ppo.stat_min_count": 2}, **{"ddpo.steps": 3}, beta=0.0 if method == "draft" else 6.0)
    return only_owned_sections(tiny_config(**{**base, **changes}))  # a section the method does not use is refused


_REFERENCES: dict = {}


def reference_run(method: str, tmp_path_factory) -> Path:
    """The uninterrupted run a resumed one must reproduce bit for bit (one per method per session)."""
    if method not in _REFERENCES:
        run = tmp_path_factory.mktemp(f"ref-{method}") / "run"
        _REFERENCES[method] = train(resume_config(method, run), progress=False).run_dir
    return _REFERENCES[method]


def same_run(got: Path, want: Path) -> None:
    assert (got / ADAPTER).read_bytes() == (want / ADAPTER).read_bytes(), "the resumed adapter must be bit-identical"
    g, w = rows_of(got), rows_of(want)
    assert [r["step"] for r in g] == list(range(STEPS + 1)), "no duplicate or missing metrics rows"
    for a, b in zip(g, w):
        a, b = dict(a), dict(b)
        a.pop("wall_time", None), b.pop("wall_time", None)  # the only clock in the metrics
        assert a == b, (a["step"], {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})


def arm_checkpoint_kill(kill) -> None:
    """In a forked child: kill = (phase, step) SIGKILLs this process inside the checkpoint of that step: "write"
    with state.safetensors half written in the temporary folder, "prune" after the rename and before the old
    checkpoints are pruned (None: nothing)."""
    from cmalign.training import checkpoint as ckpt

    if kill is None:
        return
    phase, step = kill
    name = f"step_{step:06d}"
    if phase == "write":
        real_save = ckpt.save_file

        def save_file(tensors, filename):
            real_save(tensors, filename)
            if name in filename:
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.save_file = save_file
    else:
        real_fsync = ckpt._fsync_dir

        def fsync_dir(path):
            real_fsync(path)
            if ckpt.list_checkpoints(path)[-1].name == name:
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt._fsync_dir = fsync_dir


def _train_child(cfg, resume, log, kill):
    """A forked training process (no 6 s of imports per start). kill = (phase, step): SIGKILL itself
    inside the checkpoint of that step: "write" with state.safetensors half written in the temporary
    folder, "prune" after the rename and before the old checkpoints are pruned."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    arm_checkpoint_kill(kill)
    try:
        train(cfg, progress=False, resume=resume)
        code = 0
    except UserError as exc:
        print(f"cmalign: error: {exc}", flush=True)
        code = 2
    os._exit(code)


def fork_train(cfg, resume, log, kill=None):
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_train_child, args=(cfg, resume, str(log), kill))
    proc.start()
    return proc


METHODS = ["rocm", "rlcm", "ddpo", "draft", "dpok", "d3po"]


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_at_random_moments_then_resume_is_bit_identical(method, tmp_path, tmp_path_factory):
    """Killed mid-checkpoint (either phase), then at a random moment, then resumed: the same adapter
    and metrics as the uninterrupted run. Half the methods are first killed inside their very first
    checkpoint, before any complete one exists: the same command (no --resume) must start them again."""
    want = reference_run(method, tmp_path_factory)
    rng = random.Random(METHODS.index(method))
    run, log = tmp_path / "run", tmp_path / "log.txt"
    first = ("write", 1) if METHODS.index(method) % 2 == 0 else (rng.choice(["write", "prune"]), 2)
    proc = fork_train(resume_config(method, run), None, log, kill=first)
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, log.read_text()[-2000:]
    done = ckpt_steps(run)
    assert max(done, default=0) == first[1] - (first[0] == "write"), done
    # a random moment of a resumed (or restarted) run: mid-step, mid-evaluation or mid-checkpoint
    resume = "latest" if done else None
    proc = fork_train(resume_config(method, run), resume, log)
    deadline, target = time.time() + 120, first[1] + 1
    while proc.is_alive() and time.time() < deadline and max(ckpt_steps(run), default=0) < target:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.25))
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(120)
    proc = fork_train(resume_config(method, run), "latest", log)
    proc.join(180)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    same_run(run, want)
    assert len(list_checkpoints(run / "checkpoints")) == 2, "keep_checkpoints keeps the newest two"
    assert not list((run / "checkpoints").glob(".*")), "no half-written checkpoint left after a clean finish"


def ckpt_steps(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run / "checkpoints")]


def _cli_child(args, log, kill=None):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    arm_checkpoint_kill(kill)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
    os._exit(cli.main(args))


def fork_cli(args, log, kill=None):
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_cli_child, args=(args, str(log), kill))
    proc.start()
    return proc


def test_sigterm_checkpoints_the_current_step_prints_the_resume_command_and_resumes_bit_identically(tmp_path, tmp_path_factory):
    want = reference_run("rocm", tmp_path_factory)
    run, log = tmp_path / "run", tmp_path / "log.txt"
    cfg = resume_config("rocm", run)
    # no periodic checkpoints: the only one is the one SIGTERM asks for
    args = ["train", *TINY_ARGS, "--steps", str(STEPS), "--batch-size", "2", "--eval-every", "2", "--grid-every", "4",
            "--eval-size", "2", "--final-eval-size", "0", "--checkpoint-every", "0", "--keep-checkpoints", "2",
            "--lr", "1e-2", "--beta", f"{cfg.beta:g}", "--ema-decay", "0.8", "--prompts", *cfg.prompts, "--output-dir", str(run)]
    proc = fork_cli(args, log)
    deadline = time.time() + 120
    while proc.is_alive() and time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(rows_of(run)) >= 2):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(120)
    text = log.read_text()
    assert proc.exitcode == 128 + signal.SIGTERM, text[-3000:]
    stopped = rows_of(run)[-1]["step"]
    assert 1 <= stopped <= STEPS and ckpt_steps(run) == [stopped], (stopped, ckpt_steps(run))
    assert f"stopped by SIGTERM at step {stopped}" in text
    hint = [line for line in text.splitlines() if line.startswith("cmalign: resume with: ")]
    assert len(hint) == 1, text[-2000:]
    command = shlex.split(hint[0].split(": ", 2)[2])
    assert command[:2] == ["cmalign", "train"] and command[-4:] == ["--resume", "latest", "--output-dir", str(run)]
    proc = fork_cli(command[1:], log)  # the printed command, exactly
    proc.join(180)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    same_run(run, want)


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
def test_non_differentiable_reward_with_draft_names_the_alternatives():
    from cmalign.methods.draft import Draft  # (rocm takes it: methods/hybrid.py, tests/test_hybrid.py)

    class Stub:
        name, differentiable = "jpeg_compressibility", False

    with pytest.raises(UserError, match="not differentiable.*(rlcm|ddpo)"):
        Draft(tiny_config(beta=0.0), world=None, reward=Stub())


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
    args = ["train", *TINY_ARGS, "--steps", "1", "--final-eval-size", "0", "--checkpoint-every", "0", "--output-dir", str(run)]
    code, _, err = run_cli(capsys, *args, "--resume", "latest")
    assert code == 2 and one_error_line(err, "holds no checkpoint"), err  # a finished run: nothing to resume
    # A run killed before its first checkpoint (config.yaml, no checkpoint, no adapter) starts again with
    # the --resume latest a killed run suggests (with the same command: the SIGKILL tests).
    shutil.rmtree(run / "adapter")
    code, out, err = run_cli(capsys, *args, "--resume", "latest")
    assert code == 0 and "starting it again" in out, err
    assert (run / ADAPTER).is_file() and [r["step"] for r in rows_of(run)] == [0, 1]


# --- a checkpoint belongs to its run; one writer per run; overwrite leaves nothing behind ------------------
def test_another_runs_checkpoint_is_refused_and_nothing_changes(checkpointed_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(checkpointed_run, other)
    text = (other / "config.yaml").read_text()
    assert "beta: 5.5" in text
    (other / "config.yaml").write_text(text.replace("beta: 5.5", "beta: 2.0"))  # a run of another config
    before, mine = snapshot(other), snapshot(checkpointed_run)
    common = ["train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0", "--checkpoint-every", "1", "--beta", "2.0"]
    foreign = list_checkpoints(checkpointed_run / "checkpoints")[-1]
    for resume in (str(foreign), "latest"):  # another run's folder, and the copy this run holds of it
        code, _, err = run_cli(capsys, *common, "--output-dir", str(other), "--resume", resume)
        assert code == 2 and one_error_line(err, "belongs to a run with a different config (beta)"), err
    assert snapshot(other) == before and snapshot(checkpointed_run) == mine


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(checkpointed_run, capsys):
    before = snapshot(checkpointed_run)
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--steps", "1", "--final-eval-size", "0", "--checkpoint-every", "1",
                           "--output-dir", str(checkpointed_run), "--resume", "latest")
    assert code == 2 and one_error_line(err, "at step 2, beyond steps=1"), err
    assert snapshot(checkpointed_run) == before, "config.yaml is not rewritten"


def _hold(run, ready):
    from cmalign.training.run_dir import RunLock

    lock = RunLock(run).acquire()  # noqa: F841
    ready.set()
    time.sleep(120)


def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(checkpointed_run, tmp_path, capsys):
    import multiprocessing

    from cmalign.training.run_dir import RunLock

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(run, ready))  # the first writer
    holder.start()
    try:
        assert ready.wait(30)
        before = snapshot(run)
        args = ["train", *TINY_ARGS, "--steps", "3", "--final-eval-size", "0", "--checkpoint-every", "1", "--output-dir", str(run)]
        for extra in (["--resume", "latest"], ["--overwrite"]):
            code, _, err = run_cli(capsys, *args, *extra)
            assert code == 2 and one_error_line(err, f"is being written by another cmalign process (pid {holder.pid}"), err
        assert snapshot(run) == before, "--overwrite deleted nothing: the lock comes first"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with RunLock(run):  # SIGKILL left no stale lock
        pass


def test_two_training_processes_into_one_folder(tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    args = ["train", *TINY_ARGS, "--steps", "200", "--final-eval-size", "0", "--checkpoint-every", "0", "--output-dir", str(run)]
    first = fork_cli(args, log)
    try:
        deadline = time.time() + 60
        while first.is_alive() and time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.01)
        assert first.is_alive(), log.read_text()[-2000:]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and one_error_line(err, "is being written by another cmalign process"), err
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()


def test_overwrite_leaves_nothing_of_the_old_run(checkpointed_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)  # checkpoints at steps 1 and 2, grids at 0 and 2, an adapter
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    base = ["train", *TINY_ARGS, "--final-eval-size", "0", "--checkpoint-every", "1", "--grid-every", "1",
            "--output-dir", str(run)]
    code, _, err = run_cli(capsys, *base, "--steps", "1", "--beta", "-1", "--overwrite")  # invalid: nothing is deleted
    assert code == 2 and one_error_line(err, "beta"), err
    assert snapshot(run) == before
    code, _, err = run_cli(capsys, *base, "--steps", "1", "--beta", "3", "--overwrite")
    assert code == 0, err
    assert ckpt_steps(run) == [1], "the old run's step 2 checkpoint is gone"
    assert [r["step"] for r in rows_of(run)] == [0, 1]
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["step_000000.png", "step_000001.png"]
    assert (run / "notes.txt").read_text() == "mine", "files that are not the run's stay"
    _, meta = read_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert meta["config"]["beta"] == 3.0


# --- full disk, unwritable output ----------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from cmalign.training import checkpoint as ckpt

    run = tmp_path / "run"
    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda t, f: _enospc() if "step_000002" in f else real(t, f))
    args = ["train", *TINY_ARGS, "--steps", "2", "--final-eval-size", "0", "--checkpoint-every", "1", "--output-dir", str(run)]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_error_line(err, "cannot write checkpoint"), err
    assert "No space left on device" in err and f"{run / 'checkpoints' / 'step_000001'} is intact" in err
    assert ckpt_steps(run) == [1] and not list((run / "checkpoints").glob(".*")), "no temporary folder left"
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--resume", "latest")
    assert code == 0 and ckpt_steps(run) == [1, 2] and (run / ADAPTER).is_file(), err


def test_full_disk_at_the_adapter_keeps_the_checkpoint_and_resume_finishes(tmp_path, monkeypatch, capsys):
    from cmalign.worlds.digits.world import DigitsWorld

    run = tmp_path / "run"
    real = DigitsWorld.save_adapter
    monkeypatch.setattr(DigitsWorld, "save_adapter", lambda self, d: _enospc() if Path(d).name == ".adapter.tmp" else real(self, d))
    args = ["train", *TINY_ARGS, "--steps", "1", "--final-eval-size", "0", "--checkpoint-every", "1", "--output-dir", str(run)]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_error_line(err, "cannot write the adapter"), err
    assert not (run / "adapter").exists() and not (run / ".adapter.tmp").exists() and ckpt_steps(run) == [1]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--resume", "latest")
    assert code == 0 and (run / ADAPTER).is_file(), err


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from cmalign.worlds.digits.world import DigitsWorld

    blocker = tmp_path / "file"
    blocker.write_text("x")

    def no_work(*a, **k):
        raise AssertionError("expensive work started before the output folder was checked")

    for name in ("prepare", "from_config"):  # building the world (and its cache) is where the cost starts
        monkeypatch.setattr(DigitsWorld, name, classmethod(no_work))
    out = str(blocker / "out")
    for args in (["train", *TINY_ARGS, "--output-dir", out], ["sample", "--out", out], ["eval", "--out", str(blocker / "sub" / "m.json")],
                 ["reward-model", "train", "--out", out, "--num-pairs", "10"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and one_error_line(err, "cannot be created: Not a directory"), (args, err)
    assert blocker.read_text() == "x"


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
