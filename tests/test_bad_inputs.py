"""A table of bad inputs: each is one `cmalign: error:` line with exit code 2, before any expensive
work, and leaves every file that existed before unchanged."""

import hashlib

import numpy as np
import pytest
import torch

from cmalign.cli import main
from cmalign.rewards.bradley_terry import PreferencePairs


def snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


YAML_CASES = [
    ("beta: high\n", "beta must be a number"),
    ("beta: .inf\n", "beta must be finite"),
    ("steps: 2.5\n", "steps must be an integer"),
    ("ppo: {epochs: many}\n", "ppo.epochs must be an integer"),
    ("ppo: {nope: 1}\n", "unknown config key"),
    ("digits_resolution: '8'\n", "digits.resolution must be an integer"),
    ("reward_weights: [proxy]\n", "reward_weights must be a mapping"),
    ("reward_weights: {proxy: .nan}\n", "reward_weights must be finite"),
    ("prompts: a handwritten one\n", "prompts must be a list"),
    ("final_step: sometimes\n", "final_step must be floor | skip"),
    ("- a\n- b\n", "must be a mapping"),
    ("beta: [1\n", "not valid YAML"),
    ("grad_checkpointing: maybe\n", "grad_checkpointing must be true or false"),
    ("clamp: 3\n", "clamp must be"),
]

FLAG_CASES = [
    (["--beta", "inf"], "beta must be finite"),
    (["--beta", "nan"], "beta must be finite"),
    (["--reward-scale", "nan"], "reward_scale must be finite"),
    (["--reward-scale", "0"], "reward_scale must be > 0"),
    (["--reward-weights", "proxy=nan"], "reward_weights must be finite"),
    (["--reward-weights", "proxy"], "expected NAME=VALUE"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "inf"], "lr must be finite"),
    (["--threads", "-2"], "threads must be >= 1"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["--batch-size", "100000000"], "batch_size must be >= 1"),
    (["--eval-size", "0"], "eval_size must be >= 1"),
    (["--final-eval-size", "-1"], "final_eval_size must be >= 0"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--num-steps", "0"], "num_steps"),
    (["--num-steps", "51"], "num_steps"),
    (["--lora-rank", "0"], "lora_rank must be >= 1"),
    (["--lora-alpha", "0"], "lora_alpha must be > 0"),
    (["--grad-clip", "-1"], "grad_clip must be >= 0"),
    (["--ema-decay", "1.5"], "ema_decay must be in (0, 1)"),
    (["--max-bad-steps", "0"], "max_bad_steps must be >= 1"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["--max-train-seconds", "0"], "max_train_seconds must be > 0"),
    (["--device", "tpu"], "device must be auto, cpu or cuda"),
    (["--divergence", "wasserstein"], "unknown divergence"),
    (["--method", "ppo"], "unknown method 'ppo'"),
    (["--world", "mnist"], "unknown world 'mnist'"),
    (["--reward-weights", "gold=1"], "never a training reward"),
    (["--reward-weights", "pickscore=1"], "unknown reward 'pickscore' for the digits world"),
    (["--reward-paths", "pickscore=/x"], "reward_paths names pickscore"),
    (["--report-to", "nosuch"], "unknown tracker"),
    (["--reward-paths", "proxy=/no/such/folder"], "no such file or folder: /no/such/folder (given with --reward-paths proxy=PATH)"),
    (["--method", "draft", "--beta", "2"], "no divergence term"),
    (["--method", "d3po", "--batch-size", "3"], "batch_size must be even"),
    (["--method", "d3po", "--beta", "0"], "d3po needs beta > 0"),
    (["--method", "rlcm", "--num-steps", "1"], "K >= 2"),
    (["--method", "rlcm", "--batch-size", "1"], "ppo.minibatches (2) must be <= batch_size (1)"),
    (["--ppo.clip", "0"], "ppo.clip must be > 0"),
    (["--ddpo.steps", "1"], "ddpo.steps must be in [2, 1000]"),
    (["--digits.resolution", "12"], "digits.resolution must be 8 or 16"),
    (["--digits.proxy-pairs", "5"], "digits.proxy_pairs must be >= 10"),
    (["--lcm.resolution", "500"], "lcm.resolution must be a positive multiple of 8"),
    (["--lcm.heldout-fraction", "1.0"], "lcm.heldout_fraction must be in [0, 1)"),
    (["--preset", "nosuchpreset"], "unknown preset"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--eval-prompts", " "], "eval_prompts must be non-empty"),
    (["--no-such-flag", "1"], "Unrecognized options"),
    # options that do not apply to the chosen world, method or finetune mode: refused, never recorded and ignored
    (["--finetune", "full", "--lora-rank", "4"], "lora_rank is a LoRA setting"),
    (["--finetune", "full", "--lora-alpha", "4"], "lora_alpha is a LoRA setting"),
    (["--lcm.scheduler", "tcd", "--lcm.tcd-gamma", "0.5"], "section lcm belongs to the lcm world"),
    (["--lcm.guidance-scale", "3"], "lcm.guidance_scale: section lcm belongs to the lcm world"),
    (["--ddpo.steps", "5"], "section ddpo belongs to the ddpo method"),
    (["--ppo.epochs", "3"], "section ppo belongs to the policy-gradient methods"),
    (["--js-estimator", "mc"], "the divergence is kl"),
    (["--divergence", "js", "--js-samples", "4", "--beta", "0", "--method", "draft"], "beta = 0 switches the divergence off"),
    (["--method", "dpok", "--divergence", "js", "--js-estimator", "mc"], "dpok computes its Jensen–Shannon term by quadrature"),
]


def _check_refusal(capsys, args, words, root):
    before = snapshot(root)
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("cmalign: warning: ")]  # notices such as a deprecated name
    assert code == 2, (args, lines)
    assert len(err) == 1 and err[0].startswith("cmalign: error:"), (args, lines)
    assert words in err[0], (args, err[0])
    assert snapshot(root) == before, args


@pytest.mark.parametrize("text,words", YAML_CASES)
def test_bad_yaml_config(tmp_path, capsys, text, words):
    (tmp_path / "cfg.yaml").write_text(text)
    _check_refusal(capsys, ["train", "--config", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "run")], words, tmp_path)
    assert not (tmp_path / "run").exists()


def test_bad_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a user's file")
    for args, words in FLAG_CASES:
        _check_refusal(capsys, ["train", *args, "--output-dir", str(tmp_path / "run")], words, tmp_path)
    assert not (tmp_path / "run").exists()


def test_bad_sample_eval_and_pairs(tmp_path, capsys):
    for args, words in [(["sample", "--num-steps", "0", "--out", str(tmp_path / "s")], "num_steps must be >= 1"),
                        (["sample", "--num-per-prompt", "0", "--out", str(tmp_path / "s")], "num_per_prompt must be >= 1"),
                        (["sample", "--guidance-scale", "nan", "--out", str(tmp_path / "s")], "guidance_scale must be"),
                        (["sample", "--run", str(tmp_path), "--out", str(tmp_path / "s")], "not a run directory"),
                        (["eval", "--num-steps", "-3"], "num_steps must be >= 1"),
                        (["sample", "--num-steps", "1000", "--out", str(tmp_path / "s")], "num_steps must be in [1, 50]"),
                        (["eval", "--num-steps", "51"], "num_steps must be in [1, 50]")]:
        _check_refusal(capsys, args, words, tmp_path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(12, 1, 8, 8, generator=g), torch.rand(12, 1, 8, 8, generator=g)
    for name, labels, images in [("nan", torch.full((12,), float("nan")), a), ("big", torch.full((12,), 2.0), a),
                                 ("nanimg", torch.ones(12), a.clone().fill_(float("nan")))]:
        PreferencePairs(images, b, ["3"] * 12, labels).save(tmp_path / f"{name}.npz")
        _check_refusal(capsys, ["reward-model", "train", "--pairs", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / "rm")],
                       "prefer_a must be finite" if name != "nanimg" else "non-finite values", tmp_path)
    np.savez(tmp_path / "short.npz", images_a=np.zeros((3, 1, 8, 8), np.float32))
    _check_refusal(capsys, ["reward-model", "train", "--pairs", str(tmp_path / "short.npz"), "--out", str(tmp_path / "rm")],
                   "lacks the array", tmp_path)


def test_bad_experiment_out_folders(tmp_path, capsys):
    """--out is checked before any work: a file, a path under a file, a folder of a user's files or of another
    experiment's results are refused (unless --overwrite) and nothing in them changes."""
    (tmp_path / "file.txt").write_text("a user's file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "summary.csv").write_text("a,b\n1,2\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / ".cmalign-experiment").write_text("ablations\n")
    (other / "README.md").write_text("ablations' results")
    for out, words in [(tmp_path / "file.txt", "is a file"), (tmp_path / "file.txt" / "sub", "which is a file"),
                       (mine, "files that are not this experiment's (README.md, summary.csv)"),
                       (other, "holds the results of experiment ablations")]:
        _check_refusal(capsys, ["experiment", "hacking", "--quick", "--out", str(out)], words, tmp_path)
