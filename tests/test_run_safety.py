"""Unit tests of the run-safety pieces (no training): the run lock, signals, failing writes,
writability checks, checkpoint ownership, the report's links and the cache's permissions."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from cmalign.training import checkpoint as ckpt
from cmalign.training import run_dir as rs
from cmalign.errors import UserError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# --- the run lock ----------------------------------------------------------------------------------------
def test_second_writer_is_refused_in_one_line_and_the_lock_is_released(tmp_path):
    run = tmp_path / "run"
    with rs.RunLock(run):
        (run / "metrics.jsonl").write_text("{}\n")
        before = tree(run)
        with pytest.raises(UserError) as exc:
            rs.RunLock(run).acquire()  # another open file description: flock conflicts as between processes
        msg = str(exc.value)
        assert "\n" not in msg and "being written by another cmalign process" in msg and f"pid {os.getpid()}" in msg
        assert tree(run) == before, "a refused writer changes nothing"
    with rs.RunLock(run):  # released on exit
        pass


def test_a_failed_set_up_removes_the_run_folder_it_created_only(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    for run in (new, old):
        rs.RunLock(run).acquire().release(discard=True)
    assert not new.exists() and old.is_dir(), "a folder that existed before stays (with its lock file)"


def _hold_lock_then_wait(run, ready):
    lock = rs.RunLock(run).acquire()  # noqa: F841  (held while the object lives)
    ready.set()
    time.sleep(60)


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_lock_then_wait, args=(run, ready))
    child.start()
    assert ready.wait(20)
    with pytest.raises(UserError, match=f"pid {child.pid} on"):
        rs.RunLock(run).acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    with rs.RunLock(run) as lock:
        assert lock.held


# --- signals -------------------------------------------------------------------------------------------
def test_first_signal_is_recorded_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with rs.StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes of the main thread
            if stop.requested:
                break
            time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def _two_signals():
    with rs.StopSignals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    os._exit(0)  # not reached: the second signal exits at once


def test_second_signal_exits_at_once():
    child = multiprocessing.get_context("fork").Process(target=_two_signals)
    child.start()
    child.join(10)
    assert child.exitcode == 128 + signal.SIGINT


def test_resume_command_is_the_same_command_continued():
    argv = ["train", "--beta", "3", "--overwrite", "--output-dir", "runs/a b", "--resume=latest", "--steps", "9"]
    cmd = rs.resume_command(argv, Path("runs/a b"))
    assert cmd == "cmalign train --beta 3 --steps 9 --resume latest --output-dir 'runs/a b'"
    exc = rs.Preempted(signal.SIGTERM, 5, Path("runs/x/checkpoints/step_000005"), Path("runs/x"))
    assert exc.exit_code == 143 and "SIGTERM at step 5" in exc.cli_message(["train"])


# --- failing writes --------------------------------------------------------------------------------------
def test_atomic_dir_on_a_full_disk_keeps_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "w.safetensors").write_text("old")
    with pytest.raises(UserError, match=r"cannot write the adapter .*No space left on device \(ENOSPC\)"):
        with rs.atomic_dir(final, "the adapter") as tmp:
            (tmp / "w.safetensors").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (final / "w.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with rs.atomic_dir(final, "the adapter") as tmp:
        (tmp / "w.safetensors").write_text("new")
    assert (final / "w.safetensors").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_output_folder_under_a_regular_file_is_refused_before_anything_is_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, message in ((blocker / "out", "cannot be created"), (blocker, "is not a directory")):
        with pytest.raises(UserError, match=message):
            rs.ensure_writable_dir(path)
    with pytest.raises(UserError, match="cannot be created"):
        rs.ensure_writable_file(blocker / "sub" / "m.json")
    with pytest.raises(UserError, match="is a directory"):
        rs.ensure_writable_file(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert rs.ensure_writable_dir(tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == [], "the probe file is removed"


@pytest.mark.skipif(IS_ROOT, reason="running as root: chmod does not stop root from writing (the regular-file "
                                    "and full-disk cases cover the refusal)")
def test_read_only_output_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="is not writable"):
            rs.ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


def test_full_disk_probe_is_refused(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rs.os, "write", full)
    with pytest.raises(UserError, match=r"is not writable: No space left on device"):
        rs.ensure_writable_dir(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_clear_run_artefacts_removes_the_old_run_only(tmp_path):
    run = tmp_path / "run"
    for d in ("checkpoints/step_000009", "adapter", "grids", "tensorboard", ".adapter.tmp"):
        (run / d).mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl", "report.md", "gold.png", "notes.txt", rs.LOCK_NAME):
        (run / f).write_text("x")
    removed = rs.clear_run_artefacts(run)
    assert sorted(p.name for p in run.iterdir()) == [rs.LOCK_NAME, "notes.txt"]
    assert ".adapter.tmp" in removed and "checkpoints" in removed


# --- checkpoints ----------------------------------------------------------------------------------------
class FakeWorld:
    def save_adapter(self, folder):
        (Path(folder) / "adapter.safetensors").write_bytes(b"adapter")


class FakeMethod:
    def __init__(self):
        self.history = {"a seven": [0.25, -1.5]}

    def state_dict(self):
        return {"buffer": torch.tensor([1.0, 2.0])}, {"history": self.history}

    def load_state_dict(self, tensors, meta):
        self.loaded = (tensors, meta)


CONFIG = {"seed": 0, "steps": 4, "ppo": {"clip": 0.1, "epochs": 2}, "output_dir": "runs/a"}
RESUMABLE = ("steps", "output_dir")


def save(root, step, method=None, config=CONFIG, keep=2):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    return ckpt.save_checkpoint(root, step, FakeWorld(), [p], opt, None, torch.Generator().manual_seed(0), {"train_seconds": 1.0},
                                keep, config=config, resumable=RESUMABLE, method=method)


def test_checkpoint_carries_config_and_method_state_and_refuses_another_run(tmp_path):
    root = tmp_path / "checkpoints"
    method = FakeMethod()
    path = save(root, 3, method)
    tensors, meta = ckpt.read_checkpoint(path)
    assert meta["config"]["ppo.clip"] == 0.1 and meta["method"] == {"history": {"a seven": [0.25, -1.5]}}
    restored = FakeMethod()
    p = torch.nn.Parameter(torch.zeros(3))
    ckpt.restore(tensors, meta, [p], torch.optim.AdamW([p]), None, torch.Generator(), method=restored)
    assert torch.equal(restored.loaded[0]["buffer"], torch.tensor([1.0, 2.0])) and restored.loaded[1] == meta["method"]
    # a resume may change steps and output_dir ...
    ckpt.check_belongs(path, meta, {**CONFIG, "steps": 9, "output_dir": "elsewhere"}, RESUMABLE, steps=9)
    # ... but not what the weights were trained under, nor fall short of the checkpoint's step
    with pytest.raises(UserError, match=r"different config \(ppo\.clip, seed\)"):
        ckpt.check_belongs(path, meta, {**CONFIG, "seed": 1, "ppo": {"clip": 0.2, "epochs": 2}}, RESUMABLE)
    with pytest.raises(UserError, match="at step 3, beyond steps=2; pass --steps 3"):
        ckpt.check_belongs(path, meta, CONFIG, RESUMABLE, steps=2)


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_no_temporary(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = save(root, 1)
    before = tree(root)
    real = ckpt.save_file

    def half_then_full(tensors, filename):
        real(tensors, filename)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", half_then_full)
    with pytest.raises(UserError) as exc:
        save(root, 2)
    msg = str(exc.value)
    assert "\n" not in msg and "step_000002" in msg and "No space left on device" in msg and f"{good} is intact" in msg
    assert tree(root) == before, "the last good checkpoint is untouched and no temporary folder is left"
    monkeypatch.undo()
    assert ckpt.list_checkpoints(root) == [good]
    save(root, 2)  # the next write works: nothing blocks it
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000001", "step_000002"]


def test_pruning_never_removes_the_new_checkpoint_and_leftovers_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3):
        save(root, s)
    (root / ".tmp_step_000004").mkdir()  # a killed run's half-written checkpoint
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002", "step_000003"]
    assert ckpt.remove_newer(root, 2) == [root / "step_000003"]
    save(root, 3)
    save(root, 3)  # rewritten at the same step: replaced, not lost
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]


def test_an_old_format_checkpoint_is_refused_with_its_reason(tmp_path):
    path = save(tmp_path / "checkpoints", 1)
    meta = json.loads((path / ckpt.STATE_JSON).read_text())
    (path / ckpt.STATE_JSON).write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(UserError, match="format 1 carried no run config"):
        ckpt.read_checkpoint(path)


# --- report and cache ------------------------------------------------------------------------------------
def test_report_links_only_the_plots_that_exist(tmp_path):
    from cmalign.training import report

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5, "divergence": 0.1}) + "\n")
    written = report.plot_curves(tmp_path)  # no gold in these metrics: an lcm run
    assert sorted(p.name for p in written) == ["divergence.png", "reward.png"]
    final = {"n": 2, "base": {"reward": {"mean": 0.0, "std": 1.0}}, "tuned": {"reward": {"mean": 1.0, "std": 1.0}}}
    text = report.write_report(tmp_path, "summary", final).read_text()
    assert "reward.png" in text and "divergence.png" in text
    assert "gold.png" not in text and "before_after.png" not in text


def test_report_on_a_full_disk_is_one_line_and_keeps_the_old_report(tmp_path, monkeypatch):
    from cmalign.training import report

    (tmp_path / "report.md").write_text("old")
    monkeypatch.setattr(report.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    final = {"n": 1, "base": {}, "tuned": {"reward": {"mean": 1.0, "std": 0.0}}}
    with pytest.raises(UserError, match=r"cannot write the report .*report\.md: No space left on device"):
        report.write_report(tmp_path, "summary", final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"] and (tmp_path / "report.md").read_text() == "old"


@pytest.mark.parametrize("mask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_cache_staging_folder_honours_the_umask(tmp_path, mask, mode):
    from cmalign import cache

    old = os.umask(mask)
    try:
        tmp = cache.staging_dir(tmp_path / "entry")
    finally:
        os.umask(old)
    assert stat.S_IMODE(tmp.stat().st_mode) == mode
    cache.publish_dir(tmp, tmp_path / "entry")
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == mode
