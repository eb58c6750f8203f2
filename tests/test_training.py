"""ROCM training on the tiny digits world: the objective improves the proxy, the run directory
holds every promised artefact, and the adapter round-trips."""

import dataclasses
import json

import pytest
import torch

from cmalign.errors import UserError
from cmalign.training.trainer import train
from cmalign.training.build import build_world
from helpers import tiny_config


def test_short_rocm_run_raises_proxy_reward(tmp_path):
    cfg = tiny_config(steps=30, batch_size=16, lr=3e-3, beta=0.1, eval_every=30, grid_every=30,
                      eval_size=40, final_eval_size=0, output_dir=str(tmp_path / "run"))
    run = train(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 30
    # The same fixed evaluation chains, before and after training.
    assert last["eval_reward"] > first["eval_reward"] + 0.1, (first["eval_reward"], last["eval_reward"])
    assert last["eval_divergence"] > 0


def test_run_directory_contract(tmp_path):
    run = train(tiny_config(output_dir=str(tmp_path / "run")), progress=False)
    for name in ("config.yaml", "metrics.jsonl", "adapter/adapter.safetensors", "final_eval.json", "report.md",
                 "reward.png", "gold.png", "divergence.png", "before_after.png", "grids/step_000000.png", "grids/step_000004.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))  # accelerate: tensorboard/<project>/
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("reward", "divergence", "loss", "wall_time", "gold", "grad_norm"):
            assert key in r and r[key] is not None, key
        # the default regulariser measures one drawn step per update: div_k of that step, null for the others
        assert sum(r[f"div_{k}"] is not None for k in range(1, 5)) == 1
    final = json.loads((run / "final_eval.json").read_text())
    for side in ("base", "tuned"):
        assert {"reward", "gold", "accuracy"} <= set(final[side])
        assert final[side]["gold"]["n"] == 20
    # the same test chains one row each (the data behind intervals over chains), means as in final_eval.json
    import csv

    chains = list(csv.DictReader(open(run / "final_eval_chains.csv")))
    assert len(chains) == 20 and [int(r["index"]) for r in chains] == list(range(20))
    assert {"prompt", "gold", "accuracy", "reward", "kl_to_base", "distance_to_base", "base_gold", "base_reward"} <= set(chains[0])
    for column, side, key in (("gold", "tuned", "gold"), ("base_gold", "base", "gold"), ("reward", "tuned", "reward")):
        mean = sum(float(r[column]) for r in chains) / len(chains)
        assert abs(mean - final[side][key]["mean"]) < 1e-3 * max(1.0, abs(mean)), column


def test_adapter_round_trip_reproduces_samples(tmp_path):
    from cmalign.chain import generate

    cfg = tiny_config(output_dir=str(tmp_path / "run"), lr=1e-2, final_eval_size=0)
    run = train(cfg, progress=False)
    trained = build_world(cfg)
    trained.load_adapter(run / "adapter")
    fresh = build_world(cfg)
    prompts = ["a handwritten three"] * 4
    a = generate(trained, prompts, 4, torch.Generator().manual_seed(1))
    b = generate(fresh, prompts, 4, torch.Generator().manual_seed(1))
    base = generate(trained, prompts, 4, torch.Generator().manual_seed(1), reference=True)
    assert not torch.allclose(a, b), "the trained adapter must change the samples"
    assert torch.equal(base, b), "disabling the adapter must give the base model exactly"


def test_existing_run_directory_is_refused(tmp_path):
    cfg = tiny_config(output_dir=str(tmp_path / "run"), steps=1, final_eval_size=0)
    train(cfg, progress=False)
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(output_dir=str(tmp_path / "run"), steps=1, beta=1.0), progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_gold_is_refused_as_training_reward(tmp_path):
    with pytest.raises(UserError, match="never a training reward"):
        train(tiny_config(output_dir=str(tmp_path / "run"), reward_weights={"gold": 1.0}), progress=False)


def test_wall_clock_budget_stops_early_with_a_final_evaluation(tmp_path, capsys):
    cfg = tiny_config(steps=50, eval_every=20, max_train_seconds=1e-6, output_dir=str(tmp_path / "run"))
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and "eval_gold" in rows[-1]
    assert "max_train_seconds" in capsys.readouterr().out
    # It left a checkpoint, so a larger budget continues the same run.
    train(dataclasses.replace(cfg, steps=3, max_train_seconds=None), progress=False, resume="latest")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_eval_prompts_make_the_fixed_evaluation_set(tmp_path):
    from cmalign.training.trainer import Trainer

    cfg = tiny_config(steps=1, prompts=["a handwritten one", "a handwritten two"], eval_prompts=["a handwritten nine"],
                      output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.train_prompts == ["a handwritten one", "a handwritten two"]
    assert trainer.eval_prompts == ["a handwritten nine"]
    trainer.train()
    assert set(trainer.eval_set[0]) == {"a handwritten nine"}
    with pytest.raises(UserError, match="eval_prompts"):
        Trainer(tiny_config(eval_prompts=[" "], output_dir=str(tmp_path / "bad")), progress=False)
