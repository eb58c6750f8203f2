"""The command line: smoke tests of every command and one clear line with exit code 2 for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmalign.cli import main
from helpers import TINY_ARGS


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--output-dir", str(run)]) == 0
    return run


def test_train_sample_eval(trained_run, tmp_path, capsys):
    assert (trained_run / "adapter" / "adapter.safetensors").is_file()
    out = tmp_path / "samples"
    code, stdout, _ = run_cli(capsys, "sample", "--run", str(trained_run), "--num-per-prompt", "3", "--out", str(out),
                              "--prompts", "a handwritten seven", "2")
    assert code == 0, stdout
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 1, 8, 8) and data["images"].dtype == np.float32
    assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0
    assert list(data["prompts"]) == ["a handwritten seven"] * 3 + ["2"] * 3
    assert len(list(out.glob("0*.png"))) == 6 and (out / "grid.png").is_file()

    report = tmp_path / "eval"
    code, stdout, _ = run_cli(capsys, "eval", "--run", str(trained_run), "--num-per-prompt", "4", "--out", str(report))
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    rows = {(r["model"], r["reward"]): r for r in summary["rows"]}
    assert {"proxy", "gold", "accuracy", "ink", "nn"} <= {reward for _, reward in rows}
    assert rows["base", "gold"]["n"] == 40 and rows["run", "gold"]["win_rate_vs_base"] is not None
    assert set(summary["diversity"]) == {"base", "run"}
    assert "gold" in stdout and "accuracy" in stdout


def test_reward_model_train_from_pairs_file(tmp_path, capsys):
    from cmalign.rewards.bradley_terry import PreferencePairs
    from cmalign.worlds.digits.proxy import load_proxy

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g)
    prefer_a = (a.mean((1, 2, 3)) > b.mean((1, 2, 3))).float()  # a user who likes brighter images
    PreferencePairs(a, b, ["3"] * 64, prefer_a).save(tmp_path / "pairs.npz")
    code, stdout, err = run_cli(capsys, "reward-model", "train", "--pairs", str(tmp_path / "pairs.npz"), "--out", str(tmp_path / "rm"))
    assert code == 0, err
    model = load_proxy(tmp_path / "rm")
    bright, dark = torch.full((1, 1, 8, 8), 0.9), torch.full((1, 1, 8, 8), 0.1)
    assert model(bright, ["3"]) > model(dark, ["3"])


BAD_TRAIN = [
    (["--divergence", "wasserstein"], "unknown divergence"),
    (["--reward-weights", "pickscore_typo=1.0"], "unknown reward"),
    (["--reward-weights", "proxy"], "NAME=VALUE"),
    (["--beta", "-1"], "beta must be >= 0"),
    (["--num-steps", "0"], "num_steps"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--num-steps", "2", "--backprop-steps", "3"], "backprop_steps"),
    (["--world", "atari"], "unknown world"),
    (["--method", "magic"], "unknown method"),
    (["--beta", "abc"], "Error parsing --beta: could not convert string to float: 'abc'"),
    (["--no-such-flag", "2"], "Unrecognized options: --no-such-flag"),
    (["--method", "d3po", "--batch-size", "7"], "batch_size must be even"),
    (["--max-train-seconds", "0"], "max_train_seconds must be > 0"),
    (["--preset", "no-such-preset"], "unknown preset"),
]


@pytest.mark.parametrize("args,message", BAD_TRAIN)
def test_bad_train_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--output-dir", str(out_dir), *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cmalign: error:") and message in lines[0], err
    assert not out_dir.exists(), "bad input must not create or touch the run directory"


def test_prompt_file_errors(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un chiffre sept \xe9".encode("latin-1"))
    for path, message in ((missing, "does not exist"), (empty, "has no prompts"), (latin, "not UTF-8")):
        code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--prompt-file", str(path), "--output-dir", str(tmp_path / "r"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_corrupt_cache_is_reported_not_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMALIGN_CACHE", str(tmp_path / "cache"))
    from cmalign.worlds.digits.factory import pretrain_config_for
    from cmalign.worlds.digits import cache
    from helpers import tiny_config

    cfg = pretrain_config_for(tiny_config())
    folder = cache.build_and_cache(cfg, progress=False)
    weights = folder / "consistency.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    corrupt = weights.read_bytes()
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "unreadable" in err and str(folder) in err
    assert weights.read_bytes() == corrupt, "the corrupt file is left for the user to inspect"
    assert not (tmp_path / "run").exists()


def test_unknown_command_and_help(capsys):
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "unknown command" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "train" in out and "sample" in out


def test_console_script_exit_code():
    """A real process: bad input gives exit code 2, one line on stderr and no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "cmalign", "train", "--beta", "-3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cmalign: error: beta must be >= 0, got -3.0"


def test_help_into_a_closed_pipe_is_quiet():
    """`cmalign experiment --help | head -1`: the reader leaves first; no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "cmalign", "experiment", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has printed anything (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and err == ""
