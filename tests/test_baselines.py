"""The baselines on the shared rollout core: PPO's log-probabilities, ratio and clipping (rlcm, ddpo,
dpok), DDPO's DDIM chain against diffusers, DRaFT-K's truncation, D3PO's pairs and loss, and the
baselines on the lcm world."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from cmalign.chain import ChainNoise, DDIMTransition, run_chain
from cmalign.experiments.common import only_owned_sections
from cmalign.methods.base import Batch
from cmalign.training.build import build_method
from cmalign.methods.policy_gradient import PerPromptStats, gaussian_logprob, ppo_loss
from cmalign.rewards.registry import build_weighted, reward_context
from cmalign.training.build import build_world
from helpers import tiny_config

PROMPTS = ["a handwritten three", "a handwritten seven"] * 4


def digits_method(method: str, **overrides):
    cfg = only_owned_sections(tiny_config(method=method, **{"ddpo.steps": 5}, **overrides))
    from cmalign.config import validate

    validate(cfg)
    world = build_world(cfg)
    reward = build_weighted(cfg.reward_weights, reward_context(world, cfg))
    return cfg, world, build_method(cfg, world, reward)


def test_gaussian_logprob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    for sigma in (0.05, 0.7, 1.0):
        expected = torch.distributions.Normal(mean, sigma).log_prob(x).flatten(1).mean(1)
        assert torch.allclose(gaussian_logprob(x, mean, sigma), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["rlcm", "ddpo"])
def test_rollout_logprobs_are_the_chain_gaussians_and_ratio_is_one_before_update(method):
    cfg, world, pg = digits_method(method, **{"ppo.minibatches": 1})
    cond, states, old, rewards, images = pg.rollout(Batch(PROMPTS, torch.Generator().manual_seed(1)))
    k_steps = pg.num_steps  # ddpo: its DDIM chain's ddpo.steps
    assert old.shape == (len(PROMPTS), k_steps - 1) and len(states) == k_steps  # the final step is no action
    # The stored log-probabilities are those of the chain's own per-step Gaussians.
    with torch.no_grad():
        traj = run_chain(world, cond, None, pg.timesteps, states=states[:-1])
    for k in range(k_steps - 1):
        expected = torch.distributions.Normal(traj.means[k], traj.sigmas[k]).log_prob(states[k + 1]).flatten(1).mean(1)
        assert torch.allclose(old[:, k], expected, atol=1e-5)
    # Re-evaluated with gradient, before any update: the PPO ratio is exactly one.
    new, _ = pg.evaluate_policy(cond, states, torch.arange(len(PROMPTS)))
    assert new.requires_grad and torch.equal(new.detach(), old)
    loss, ratio, clipfrac = ppo_loss(new, old, torch.randn(len(PROMPTS)), cfg.ppo.clip)
    assert torch.equal(ratio, torch.ones_like(ratio)) and clipfrac == 0
    # The trainer-facing step reports the same and makes epochs x minibatches updates.
    calls = []

    def optimizer_step(loss):
        calls.append(loss.item())
        return 0.0

    metrics, _ = pg.step(Batch(PROMPTS, torch.Generator().manual_seed(1)), optimizer_step)
    assert metrics["ratio_first"] == 1.0 and len(calls) == cfg.ppo.epochs * cfg.ppo.minibatches


def test_clipped_objective_has_zero_gradient_outside_the_clip_range_in_the_improving_direction():
    clip = 0.1
    old = torch.zeros(4, 1)
    # ratios 1.5 (adv > 0: improving, clipped), 0.5 (adv < 0: improving, clipped),
    #        0.5 (adv > 0: worsening, not clipped), 1.05 (inside the range)
    new = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.05]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, _, clipfrac = ppo_loss(new, old, adv, clip)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0].item() == 0 and grad[1].item() == 0
    assert grad[2].item() != 0 and grad[3].item() != 0
    assert clipfrac.item() == pytest.approx(0.75)
    # The clipped surrogate never credits more than (1 + clip) * adv for a positive advantage.
    big = torch.log(torch.tensor([[10.0]]))
    assert ppo_loss(big, torch.zeros(1, 1), torch.tensor([2.0]), clip)[0].item() == pytest.approx(-(1 + clip) * 2.0)


def test_per_prompt_stats_use_batch_until_the_buffer_fills():
    stats = PerPromptStats(buffer=4, min_count=3)
    a = stats.normalize(["x", "x", "y", "y"], torch.tensor([0.0, 2.0, 10.0, 14.0]))
    batch = torch.tensor([0.0, 2.0, 10.0, 14.0])
    assert torch.allclose(a, (batch - batch.mean()) / (batch.std() + 1e-6))
    b = stats.normalize(["x", "y"], torch.tensor([4.0, 12.0]))  # both buffers now hold 3
    assert torch.allclose(b, torch.tensor([(4 - 2) / 2.0, 0.0]), atol=1e-5)


def test_ddim_transition_matches_diffusers_ddim_eta_one():
    cfg = tiny_config(method="ddpo", **{"ddpo.steps": 20})
    world = build_world(dataclasses.replace(cfg, num_steps=20))
    ts = world.timesteps(20)
    assert ts[:3] == [999, 949, 899] and ts[-1] == 49
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(20)
    assert [int(t) for t in sched.timesteps] == ts
    sched.alphas_cumprod = world.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    tr = DDIMTransition(1.0)
    for t, t_next in ((949, 899), (499, 449), (99, 49)):
        abar_t = float(world.alphas_cumprod[t])
        x0 = abar_t**0.5 * x - (1 - abar_t) ** 0.5 * v
        mean, sigma = tr.step(x, x0, t, t_next, world.alphas_cumprod)
        stock = sched.step(v, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        assert torch.allclose(mean, stock, atol=1e-5)
        assert sigma == pytest.approx(float(sched._get_variance(t, t_next)) ** 0.5, rel=1e-4)


def test_draft_detaches_exactly_the_earlier_steps():
    cfg, world, draft = digits_method("draft", beta=0.0)
    assert draft.cfg.beta == 0 and draft.cfg.backprop_steps == 1  # DRaFT-1 by default, no divergence
    params = world.trainable_parameters()
    cond = world.encode_prompts(PROMPTS)
    noise = ChainNoise.draw(len(PROMPTS), world.latent_shape, 4, torch.Generator().manual_seed(2))
    ts = world.timesteps(4)
    for k in (1, 2):
        traj = run_chain(world, cond, noise, ts, backprop_steps=k)
        assert traj.grad_steps == [False] * (4 - k) + [True] * k
        assert all(m.grad_fn is None for m in traj.means[: 4 - k]) and all(m.grad_fn is not None for m in traj.means[4 - k:])
        assert traj.states[4 - k].grad_fn is None  # the first live step starts from a detached state
    # DRaFT-1's gradient is exactly that of one network call on the (detached) last state.
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    traj = run_chain(world, cond, noise, ts, backprop_steps=1)
    g1 = torch.autograd.grad(traj.x0.square().sum(), params)
    with torch.no_grad():
        full = run_chain(world, cond, noise, ts)
    m = world.consistency(full.states[-1].detach(), ts[-1], cond)
    g2 = torch.autograd.grad(m.square().sum(), params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    assert any(a.abs().sum() > 0 for a in g1)


def test_dpok_adds_the_per_step_divergence_and_k1_is_refused():
    from cmalign.errors import UserError

    _, world, dpok = digits_method("dpok", beta=1.0)
    for p in world.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    cond, states, old, _, _ = dpok.rollout(Batch(PROMPTS, torch.Generator().manual_seed(1)))
    new, div = dpok.evaluate_policy(cond, states, torch.arange(4))
    assert div.shape == (4,) and (div > 0).all() and div.requires_grad
    with pytest.raises(UserError):
        digits_method("rlcm", num_steps=1)


def test_d3po_pairs_share_prompt_and_start_and_its_loss_is_log2_before_any_update():
    import math

    cfg, world, d3po = digits_method("d3po", beta=50.0, **{"ppo.epochs": 1}, **{"ppo.minibatches": 1})
    prompts = d3po.batch_prompts(PROMPTS)
    assert prompts[:4] == prompts[4:] == PROMPTS[:4]
    cond, states, logp, ref_logp, rewards, _ = d3po.rollout(Batch(prompts, torch.Generator().manual_seed(1)))
    assert torch.equal(states[0][:4], states[0][4:]) and not torch.equal(states[1][:4], states[1][4:])
    assert torch.equal(logp, ref_logp)  # the zero-initialised adapter: policy == reference
    losses = []

    def optimizer_step(loss):
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return 0.0

    opt = torch.optim.SGD(world.trainable_parameters(), lr=0.5)
    metrics, _ = d3po.step(Batch(prompts, torch.Generator().manual_seed(1)), optimizer_step)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and metrics["updates"] == 1
    # After the update the same pairs are preferred more: the DPO loss on them falls below log 2.
    cond, states, _, ref_logp, rewards, _ = d3po.rollout(Batch(prompts, torch.Generator().manual_seed(1)))
    win = torch.where(rewards[:4] >= rewards[4:], torch.arange(4), torch.arange(4) + 4)
    lose = torch.where(rewards[:4] >= rewards[4:], torch.arange(4) + 4, torch.arange(4))
    with torch.no_grad():
        new, _ = d3po.evaluate_policy(cond, states, torch.cat([win, lose]))
    ratio = new - ref_logp[torch.cat([win, lose])]
    assert -torch.nn.functional.logsigmoid(cfg.beta * (ratio[:4] - ratio[4:])).mean().item() < math.log(2)


def test_d3po_refuses_odd_batches():
    from cmalign.errors import UserError

    with pytest.raises(UserError, match="even"):
        digits_method("d3po", batch_size=7)


@pytest.mark.parametrize("method", ["rlcm", "draft", "dpok", "d3po"])
def test_baselines_step_on_the_tiny_lcm_world(tmp_path, method):
    from cmalign.config import TrainConfig
    from cmalign.rewards.registry import RewardContext, build_reward
    from lcm_fixtures import tiny_clip, tiny_world

    world = tiny_world(tmp_path / "world", lora_rank=4, lora_alpha=4.0)
    clip_folder, _ = tiny_clip(tmp_path / "clip")
    reward = build_reward("clip_score", RewardContext(world=world, options={"clip_score": {"path": str(clip_folder)}}))
    cfg = TrainConfig(world="lcm", method=method, num_steps=2, beta=0.5, batch_size=2, **{"ppo.epochs": 1}, **{"ppo.minibatches": 2},
                      **{"ppo.stat_buffer": 0})
    impl = build_method(cfg, world, reward)
    opt = torch.optim.SGD(world.trainable_parameters(), lr=1e-3)

    def optimizer_step(loss):
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(world.trainable_parameters(), 1.0)
        opt.step()
        return float(norm)

    prompts = ["a red cat", "a dog on grass"]
    prompts = impl.batch_prompts(prompts) if hasattr(impl, "batch_prompts") else prompts
    metrics, images = impl.step(Batch(prompts, torch.Generator().manual_seed(0)), optimizer_step)
    assert images.shape[0] == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    if method not in ("draft", "d3po"):  # minibatches of 1 from a rollout of 2: equal up to float rounding of the batch shape
        assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-5) and metrics["updates"] == 2
