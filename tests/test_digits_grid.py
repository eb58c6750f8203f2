"""Compositional digits (`--digits.grid N`): prompts, cells, per-cell scores, the conditioned network, cache keys
that leave the 8x8 models alone, and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from cmalign.config import TrainConfig, validate
from cmalign.errors import UserError
from cmalign.worlds.digits.cache import base_key
from cmalign.worlds.digits.cells import from_cells, grid_batches, to_cells
from cmalign.worlds.digits.data import digits_dataset
from cmalign.worlds.digits.factory import pretrain_config_for
from cmalign.worlds.digits.grid import GridDigitsWorld, cell_labels, default_grid_prompts, grid_gold_components, grid_prompt, grid_size_of, parse_grid_prompt
from cmalign.worlds.digits.nets import GridUNet
from cmalign.worlds.digits.pretrain import PretrainConfig
from helpers import tiny_config

TINY_GRID = dict(**{"digits.grid": 2}, **{"digits.pretrain_teacher_steps": 20}, **{"digits.pretrain_distill_steps": 10}, **{"digits.proxy_pairs": 80}, batch_size=4,
                 eval_size=10, final_eval_size=10)


def test_prompts_round_trip_and_refusals():
    labels = [7, 2, 1, 0]
    p = grid_prompt(labels, 2)
    assert p == "a 2x2 grid of handwritten digits: seven two / one zero"
    assert grid_size_of(p) == 2 and grid_size_of("a handwritten seven") is None
    assert parse_grid_prompt(p, 2) == labels
    assert parse_grid_prompt("a 2x2 grid of digits: 7 2 / 1 0", 2) == labels  # digits instead of words
    for bad, why in [("a handwritten seven", "not a grid prompt"), ("a 3x3 grid: 1 2 3 / 4 5 6 / 7 8 9", "3x3 grid"),
                     ("a 2x2 grid: seven two / one", "every row"), ("a 2x2 grid: seven two one", "names 3 digits"),
                     ("a 2x2 grid: seven two / one ten", "'ten' is not a digit class")]:
        with pytest.raises(ValueError, match=why):
            parse_grid_prompt(bad, 2)
    with pytest.raises(UserError, match="not a grid prompt"):
        cell_labels(["a handwritten seven"], 2)
    # the 8x8 world refuses a grid prompt (it names several digits)
    from cmalign.worlds.digits.data import parse_prompt

    with pytest.raises(ValueError, match="exactly one digit class"):
        parse_prompt(p)


def test_default_prompts_balance_every_cell():
    train, evaluation = default_grid_prompts(3, num_train=50)
    assert len(set(train)) == 50 and not set(train) & set(evaluation)
    cells = torch.tensor([parse_grid_prompt(p, 3) for p in evaluation])  # (10 prompts, 9 cells)
    for k in range(9):  # every cell position shows every class exactly once
        assert sorted(cells[:, k].tolist()) == list(range(10))


def test_cells_layout_and_inverse():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    cells = to_cells(x, 2)
    assert cells.shape == (8, 1, 8, 8)
    assert torch.equal(cells[1], x[0, :, :8, 8:])  # row-major: cell 1 is the top right
    assert torch.equal(cells[2], x[0, :, 8:, :8]) and torch.equal(cells[7], x[1, :, 8:, 8:])
    assert torch.equal(from_cells(cells, 2), x)
    with pytest.raises(UserError, match="16x16"):
        to_cells(torch.zeros(1, 1, 8, 8), 2)


def test_grid_gold_is_the_mean_of_the_cells_8x8_gold():
    from cmalign.worlds.digits.gold import gold_components

    world = GridDigitsWorld(GridUNet(2, "tiny"), 2, lora_rank=None)
    x, y = digits_dataset(8)
    idx = torch.tensor([[3, 10, 500, 1700], [42, 7, 900, 33]])
    grids = from_cells((x[idx.flatten()] + 1) / 2, 2)
    prompts = [grid_prompt(y[row].tolist(), 2) for row in idx]
    ours = grid_gold_components(grids, cell_labels(prompts, 2), 2)
    single = gold_components((x[idx.flatten()] + 1) / 2, y[idx.flatten()])
    for term in ("gold", "logp", "ink", "nn"):
        assert torch.allclose(ours[term], single[term].view(2, 4).mean(1), atol=1e-5)
    assert torch.allclose(world.gold(grids, prompts), ours["gold"])  # the grid world's gold (the registered gold reward's)
    # a wrong class in one cell lowers that image's gold
    wrong = [grid_prompt([(c + 1) % 10 for c in y[idx[0]].tolist()[:1]] + y[idx[0]].tolist()[1:], 2)] + prompts[1:]
    assert world.gold(grids, wrong)[0] < ours["gold"][0] - 1.0


def test_class_map_conditions_each_cell_on_its_own_class():
    net = GridUNet(2, "tiny")
    labels = torch.tensor([[1, 2, 3, 10]])  # 10: the null class of guidance
    m = net.class_map(labels)
    assert m.shape == (1, 8, 16, 16)
    emb = net.class_embedding.weight
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = m[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        assert torch.allclose(block, emb[labels[0, k]].view(-1, 1, 1).expand_as(block))
    x = torch.randn(1, 1, 16, 16)
    out = net(x, torch.tensor([500]), class_labels=labels).sample
    assert out.shape == x.shape
    other = net(x, torch.tensor([500]), class_labels=torch.tensor([[1, 2, 3, 4]])).sample
    assert not torch.allclose(out, other)
    imgs, ys = next(grid_batches(3, 5, torch.Generator().manual_seed(0)))
    assert imgs.shape == (5, 1, 24, 24) and ys.shape == (5, 9) and imgs.min() >= -1 and imgs.max() <= 1


def test_plain_digits_keep_their_cache_keys_and_grids_get_their_own():
    # the shipped 8x8 and 16x16 models are found by these keys: adding `grid` must not change them
    assert base_key(PretrainConfig()) == "r8-base-52696be79b3d"
    assert base_key(PretrainConfig(resolution=16, teacher_steps=1500, distill_steps=600)) == "r16-base-d1e080eff9c8"
    cfg2 = pretrain_config_for(TrainConfig(**{"digits.grid": 2}))
    assert cfg2.grid == 2 and cfg2.resolution == 8 and cfg2.batch_size == 32
    assert base_key(cfg2).startswith("grid2-base-") and base_key(cfg2) != base_key(replace(cfg2, grid=3))


def test_grid_config_refusals(capsys):
    for kwargs, why in [(dict(**{"digits.grid": 5}), "digits.grid must be 1, 2, 3 or 4"),
                        (dict(**{"digits.grid": 2}, **{"digits.resolution": 16}), "resolution must stay 8")]:
        with pytest.raises(UserError, match=why):
            validate(TrainConfig(**kwargs))
    from cmalign.cli import main

    for args, why in [(["--grid", "2", "--resolution", "16"], "resolution must stay 8"), (["--grid", "7"], "2, 3 or 4")]:
        assert main(["pretrain", "digits", *args]) == 2
        assert why in capsys.readouterr().err


def test_tiny_grid_run_scores_per_cell(tmp_path):
    from cmalign import train
    from cmalign.rewards.registry import build_weighted, reward_context
    from cmalign.training.build import build_world
    from cmalign.worlds.digits.grid import PerCell

    cfg = tiny_config(**TINY_GRID, steps=2, eval_every=2, grid_every=2, output_dir=str(tmp_path / "run"))
    result = train(cfg)
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    text = json.dumps(final)
    for key in ("gold", "accuracy", "heldout_proxy", "diversity"):
        assert key in text
    world = build_world(cfg)
    assert type(world) is GridDigitsWorld and world.latent_shape == (1, 16, 16) and world.grid == 2
    reward = build_weighted({"proxy": 1.0, "classifier": 1.0}, reward_context(world, cfg))
    prompts = world.default_prompts()[1][:3]
    images = torch.rand(3, 1, 16, 16, requires_grad=True)
    scores = reward(images, prompts)
    total = scores if isinstance(scores, torch.Tensor) else sum(scores.values())
    total.sum().backward()  # differentiable per cell
    assert images.grad is not None and images.grad.abs().sum() > 0
    proxy_dir = next(p for p in (world.base_folder.parent).iterdir() if p.name.startswith("proxy-grid2"))
    manifest = json.loads((proxy_dir / "manifest.json").read_text())
    assert manifest["grid"] == 2 and manifest["model"]["resolution"] == 8  # the 8x8 proxy, fitted on cell pairs
    from cmalign.worlds.digits.proxy import load_proxy

    assert isinstance(world.image_reward(load_proxy(proxy_dir)), PerCell)
    # the rating reward has no per-grid star thresholds: refused, not silently wrong
    with pytest.raises(UserError, match="rating"):
        build_weighted({"rating": 1.0}, reward_context(world, cfg))
    assert result.run_dir.exists()


@pytest.mark.parametrize("n", [2, 3])
def test_grid_base_models_ship_with_the_package(monkeypatch, tmp_path, n):
    """`cmalign train --digits-grid N` on a fresh clone pretrains nothing: the recipe resolves to the shipped float16
    weights, whose manifest names the command that rebuilds them."""
    from cmalign.worlds.digits import cache

    monkeypatch.setenv("CMALIGN_CACHE", str(tmp_path / "empty-cache"))
    cfg = pretrain_config_for(TrainConfig(**{"digits.grid": n}))
    folder = cache.locate(cfg, allow_pretrain=False)
    assert folder == cache.shipped_dir(cfg)
    info = json.loads((folder / "manifest.json").read_text())
    assert info["command"] == cache.pretrain_command(cfg) == f"cmalign pretrain digits --grid {n} --model-size base"
    assert info["config"]["grid"] == n and info["stats"]["wall_seconds"] > 0
    net, _, _ = cache.load_base(cfg, allow_pretrain=False)
    assert isinstance(net, GridUNet) and net.n == n and net.unet.config.sample_size == 8 * n
