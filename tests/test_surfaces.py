"""Every surface as safe as the command line (issue 20): the Python API's argument types, user plug-ins
(rewards, worlds, methods) checked at the boundary and blamed in one line when they raise, runs that
trained nothing never reported as a success, the http reward's transport and protocol failures, and a
checkpoint written onto a full disk. The plug-ins of these tests live in this module and are named by
import path (`test_surfaces:NAME`), as a user's package would be."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmalign import TrainConfig, train
from cmalign.cli import main
from cmalign.errors import UserError
from cmalign.methods.base import Method
from cmalign.plugins import Registry
from cmalign.rewards.http import HttpReward
from cmalign.training import checkpoint as ckpt
from cmalign.worlds.digits.world import DigitsWorld
from helpers import TINY_ARGS, tiny_config

# the smallest runs that still train: 2 chains, no evaluation beyond step 0's two chains, no trackers
FAST = {"batch_size": 2, "steps": 2, "eval_size": 2, "eval_every": 100, "grid_every": 100, "final_eval_size": 0,
        "report_to": "none", "checkpoint_every": 1}
FAST_ARGS = [*TINY_ARGS, "--batch-size", "2", "--steps", "2", "--eval-size", "2", "--eval-every", "100", "--grid-every", "100",
             "--final-eval-size", "0", "--report-to", "none", "--checkpoint-every", "1"]


def snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> tuple[str, str]:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("cmalign: warning: ") and "%|" not in line]  # the progress bar
    assert len(lines) == 1 and lines[0].startswith("cmalign: error:"), err
    assert "Traceback" not in err, err
    return lines[0], err


# --- plug-ins of the tests ------------------------------------------------------------------------
def detached_reward(images, prompts):
    return images.detach().mean(dim=(1, 2, 3))  # differentiable by default, but no gradient reaches the images


def mean_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def one_argument_reward(images):
    return images.mean(dim=(1, 2, 3))


def nan_reward(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


def zero_gradient_reward(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 0.0  # a gradient of zeros: nothing ever changes


CALLS = {"n": 0}


def raising_reward(images, prompts):
    if images.requires_grad:  # a training call (the evaluation's are without gradient)
        CALLS["n"] += 1
        if CALLS["n"] == 2:
            raise ValueError("the user's own bug")
    return images.mean(dim=(1, 2, 3))


class RaisingConstructorReward:
    def __init__(self):
        raise RuntimeError("cannot reach my model server")

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class NoUpdateMethod(Method):
    """Forgets to call optimizer_step: the run trains nothing."""

    name = "no_update"

    def step(self, batch, optimizer_step):
        return {"reward": 0.0}, torch.zeros(len(batch.prompts), 1, 8, 8)


class WrongResultMethod(Method):
    name = "wrong_result"

    def step(self, batch, optimizer_step):
        return [1.0]


class RaisingWorld(DigitsWorld):
    def step_metrics(self, images01, prompts):
        raise KeyError("a bug in the user's world")


# --- 3. the Python API's argument types --------------------------------------------------------------
API_TYPE_CASES = [
    (lambda cfg: train("config.yaml"), "train(config): expected a TrainConfig"),
    (lambda cfg: train(dict(steps=2)), "TrainConfig(**values)"),
    (lambda cfg: train(cfg, world="digits"), "TrainConfig(world='digits')"),
    (lambda cfg: train(cfg, world=DigitsWorld), "the class DigitsWorld"),
    (lambda cfg: train(cfg, reward=3), "train(reward=...)"),
    (lambda cfg: train(cfg, method=7), "train(method=...)"),
    (lambda cfg: train(cfg, overwrite="yes"), "train(overwrite=..., progress=...)"),
    (lambda cfg: train(cfg, resume=1), "train(resume=...)"),
    (lambda cfg: TrainConfig(world=None), "world must be a string, got None"),
    (lambda cfg: TrainConfig(method=7), "method must be a string, got 7"),
    (lambda cfg: TrainConfig(beta="high"), "beta must be a number"),
    (lambda cfg: TrainConfig(reward_weights=["proxy"]), "reward_weights must be a mapping"),
]


@pytest.mark.parametrize("call,words", API_TYPE_CASES)
def test_api_argument_types_are_one_type_error_line(tmp_path, monkeypatch, call, words):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(output_dir=str(tmp_path / "run"))
    with pytest.raises(TypeError) as info:
        call(cfg)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_config_whose_fields_were_set_to_wrong_types_later_is_refused_before_any_lookup(tmp_path):
    cfg = tiny_config(output_dir=str(tmp_path / "run"))
    cfg.world = None  # set after construction: train() checks again, first
    with pytest.raises(UserError, match="world must be a string, got None"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# --- 1. plug-ins checked at the boundary, and blamed in one line ---------------------------------
PLUGIN_CASES = [  # (extra flags, words of the one line, a checkpoint of step 1 exists)
    (["--reward-weights", "test_surfaces:one_argument_reward=1"], "must be a callable (images, prompts)", False),
    (["--reward-weights", "test_surfaces:RaisingConstructorReward=1"],
     "reward 'test_surfaces:RaisingConstructorReward' raised RuntimeError: cannot reach my model server while it was built", False),
    (["--reward-weights", "test_surfaces:detached_reward=1", "--beta", "0"], "`differentiable = False`", False),
    (["--reward-weights", "test_surfaces:detached_reward=1"], "carry no gradient to the images", False),
    (["--reward-weights", "test_surfaces:raising_reward=1"],
     "reward 'test_surfaces:raising_reward' raised ValueError: the user's own bug at step 2; the last good checkpoint is", True),
    (["--method", "test_surfaces:WrongResultMethod"], "step() returned list at step 1", False),
    (["--world", "test_surfaces:RaisingWorld", "--reward-weights", "test_surfaces:mean_reward=1"], "world 'test_surfaces:RaisingWorld' raised KeyError", False),
    (["--method", "test_surfaces:NoUpdateMethod"], "the trainable parameters did not change in 2 steps", True),
    (["--reward-weights", "test_surfaces:zero_gradient_reward=1", "--beta", "0"], "did not change", True),
    (["--reward-weights", "test_surfaces:nan_reward=1"], "no update was applied: all 2 steps were skipped", False),
]


@pytest.mark.parametrize("flags,words,checkpointed", PLUGIN_CASES, ids=[" ".join(c[0]) for c in PLUGIN_CASES])
def test_plugins_are_checked_and_blamed_in_one_line_and_never_reported_as_success(tmp_path, capsys, flags, words, checkpointed):
    CALLS["n"] = 0
    run = tmp_path / "run"
    assert main(["train", *FAST_ARGS, *flags, "--output-dir", str(run)]) == 2
    line, _ = one_error_line(capsys)
    assert words in line, line
    assert not (run / "adapter").exists(), "a run that failed wrote no finished adapter"
    assert bool(ckpt.list_checkpoints(run / "checkpoints")) == checkpointed
    assert not list((run / "checkpoints").glob(".tmp_*")) if (run / "checkpoints").exists() else True


def test_debug_prints_the_plugins_own_traceback_then_the_line(tmp_path, capsys):
    CALLS["n"] = 0
    assert main(["--debug", "train", *FAST_ARGS, "--reward-weights", "test_surfaces:raising_reward=1",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise ValueError("the user\'s own bug")' in err
    assert err.strip().splitlines()[-1].startswith("cmalign: error: reward 'test_surfaces:raising_reward' raised ValueError")


def test_api_detached_reward_and_nan_reward_never_report_success(tmp_path):
    with pytest.raises(UserError, match="carry no gradient to the images"):
        train(tiny_config(output_dir=str(tmp_path / "a"), **FAST), reward=detached_reward, progress=False)
    with pytest.raises(UserError, match="no update was applied"):  # steps (2) < max_bad_steps (5)
        train(tiny_config(output_dir=str(tmp_path / "b"), **FAST), reward=nan_reward, progress=False)


def test_duplicate_entry_point_names_are_refused_naming_both_packages(tmp_path, monkeypatch):
    for pkg in ("alpha_scores", "beta_scores"):
        info = tmp_path / f"{pkg}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[cmalign.rewards]\nsharpness = {pkg}.rewards:sharpness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("reward", "cmalign.rewards", lambda: None)
    with pytest.raises(UserError, match=r"defined by several installed packages: alpha_scores 1.0 .*beta_scores 1.0"):
        registry.get("sharpness")
    assert {e.dist.name for e in metadata.entry_points(group="cmalign.rewards", name="sharpness")} == {"alpha_scores", "beta_scores"}


# --- 4. the http reward: every transport and protocol failure is a skipped, counted batch ----------------
class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, *args):
        pass

    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
        mode = type(self).mode
        if mode == "bad_status":
            self.wfile.write(b"NOT-HTTP garbage\r\n\r\n")
            return
        body = {"ok": json.dumps({"scores": [0.5] * n}), "huge_int": '{"scores": [' + ", ".join(["9" * 400] * n) + "]}",
                "text": json.dumps({"scores": ["high"] * n}), "bool": json.dumps({"scores": [True] * n}),
                "short": json.dumps({"scores": [0.5]}), "list": json.dumps([0.5] * n), "not_json": "<html>",
                "deep": "[" * 100000 + "]" * 100000, "big_float": json.dumps({"scores": [1e300] * n}),
                "nan": '{"scores": [' + ", ".join(["NaN"] * n) + "]}", "truncated": json.dumps({"scores": [0.5] * n}),
                "500": "server error"}[mode].encode()
        self.send_response(500 if mode == "500" else 200)
        self.send_header("Content-Length", str(len(body) + (100 if mode == "truncated" else 0)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    srv = Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()


HTTP_FAILURES = ["500", "bad_status", "truncated", "huge_int", "big_float", "nan", "text", "bool", "short", "list", "not_json", "deep"]


@pytest.mark.parametrize("mode", HTTP_FAILURES)
def test_http_failures_are_a_skipped_batch_with_one_warning(server, mode, capsys):
    _Handler.mode = mode
    reward = HttpReward(server, timeout=5, retries=0)
    scores = reward(torch.rand(3, 1, 8, 8), ["a", "b", "c"])
    assert scores.shape == (3,) and torch.isnan(scores).all() and reward.failures == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmalign: warning: reward http") and "skipped" in err[0], err
    _Handler.mode = "ok"
    assert torch.equal(reward(torch.rand(3, 1, 8, 8), ["a", "b", "c"]), torch.full((3,), 0.5))


def test_http_reward_failing_every_step_is_not_a_success(server, tmp_path, capsys):
    _Handler.mode = "500"
    try:
        code = main(["train", *FAST_ARGS, "--method", "rlcm", "--reward-weights", "http=1", "--reward-paths", f"http={server}",
                     "http.retries=0", "--output-dir", str(tmp_path / "run")])
    finally:
        _Handler.mode = "ok"
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cmalign: error:")]
    assert len(errors) == 1 and "no update was applied" in errors[0], err
    assert "Traceback" not in err


# --- 5. a full disk ------------------------------------------------------------------------------------
def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_full_disk_at_a_checkpoint_is_one_line_keeps_the_last_good_one_and_resumes_bit_identically(tmp_path, capsys, monkeypatch):
    """On a real tmpfs where this process may mount one (root), else with safetensors' own error of a full
    disk raised at the second checkpoint: one line, step_000001 intact, no temporary, and a resume on a disk
    with room ends bit-identically with the run that never stopped."""
    args = ["train", *FAST_ARGS, "--steps", "3"]
    ref = tmp_path / "ref"
    assert main([*args, "--output-dir", str(ref)]) == 0
    capsys.readouterr()
    one_checkpoint = sum(p.stat().st_size for p in (ref / "checkpoints" / "step_000003").iterdir())
    small = tmp_path / "small"
    mounted = _mount_tmpfs(small, one_checkpoint + 48 * 1024)  # config, metrics, the step-0 grid and one checkpoint
    try:
        if not mounted:
            from safetensors import SafetensorError

            real, calls = ckpt.save_file, {"n": 0}

            def full_at_the_second(tensors, path, *a, **k):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                return real(tensors, path, *a, **k)

            monkeypatch.setattr(ckpt, "save_file", full_at_the_second)
        run = small / "run"
        assert main([*args, "--output-dir", str(run)]) == 2
        line, _ = one_error_line(capsys)
        assert "cannot write checkpoint" in line and "No space left on device (ENOSPC)" in line and "step_000001 is intact" in line
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"], "no temporary left behind"
        ckpt.read_checkpoint(run / "checkpoints" / "step_000001")
        monkeypatch.undo()
        roomy = tmp_path / "roomy"
        shutil.copytree(run, roomy)
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
    assert main([*args, "--resume", "latest", "--output-dir", str(roomy)]) == 0
    mine, want = load_file(str(roomy / "adapter" / "adapter.safetensors")), load_file(str(ref / "adapter" / "adapter.safetensors"))
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)


# --- 5. experiment --out ----------------------------------------------------------------------------
def test_experiment_out_folder_records_its_experiment_and_a_rerun_into_it_is_allowed(tmp_path):
    from cmalign.experiments import MARKER, check_out_folder

    out = check_out_folder("hacking", tmp_path / "res")
    (out / "README.md").write_text("results")
    assert (out / MARKER).read_text().strip() == "hacking"
    assert check_out_folder("hacking", out) == out  # its own outputs: a rerun writes over them
    with pytest.raises(UserError, match="holds the results of experiment hacking"):
        check_out_folder("ablations", out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("a user's notes")
    before = snapshot(mine)
    with pytest.raises(UserError, match="files that are not this experiment's"):
        check_out_folder("hacking", mine)
    assert snapshot(mine) == before
    check_out_folder("hacking", mine, overwrite=True)
