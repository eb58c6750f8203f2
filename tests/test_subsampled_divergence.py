"""The subsampled regulariser (DESIGN §2, "Subsampled regulariser"; divergences.ReferencePlan).

Averaged over EVERY possible draw (enumerated exactly, not sampled) the estimator equals the full per-step
sum, for the value and for the gradient, in float64 on a tiny digits world with a non-zero LoRA; a single
draw calls the reference network on exactly N steps of each chain (counted rows), in ROCM and in dpok.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from cmalign import divergences as D
from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.config import TrainConfig, validate
from cmalign.training.distributed import Shard
from cmalign.errors import UserError
from cmalign.methods.policy_gradient import Dpok
from cmalign.methods.rocm import Rocm
from cmalign.worlds.digits.world import DigitsWorld
from cmalign.worlds.digits.data import class_prompt
from cmalign.worlds.digits.nets import build_unet

F64 = torch.float64
K = 3
B = 3
COND = torch.tensor([3, 7, 1])
PROMPTS = [class_prompt(int(c)) for c in COND]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    w = DigitsWorld(build_unet("tiny"), resolution=8, device="cpu", lora_rank=4, lora_init=True)
    w.network.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter: the policy differs from the reference
        for n, p in w.network.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    return w


def _params(world):
    return [p for n, p in world.network.named_parameters() if "lora_" in n]


def _regulariser(world, noise, plan, name, reduction, final_step, divergence_grad, backprop_steps):
    """(value, gradient) of mean_b sum_k of the (weighted, drawn) per-step terms; plan None: the full sum."""
    params = _params(world)
    for p in params:
        p.grad = None
    kw = {"estimator": "gauss_hermite"} if name == "js" else {}
    traj = run_chain(world, COND, noise, world.timesteps(K), with_reference=True, divergence_grad=divergence_grad,
                     backprop_steps=backprop_steps, reference_rows=plan.reference_rows(K) if plan else None)
    value = step_divergences(traj, name, reduction, final_step, plan=plan, **kw).sum(1).mean()
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


CASES = [  # name, reduction, final_step, divergence_grad, backprop_steps, n steps, m chains
    ("kl", "per_dim", "floor", "full", None, 1, B),
    ("js", "joint", "skip", "stopgrad_ref", None, 1, 2),
    ("hellinger", "per_dim", "floor", "full", 2, 2, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}-n{c[5]}-m{c[6]}" for c in CASES])
def test_average_over_all_draws_equals_the_full_sum_value_and_gradient(world, case):
    name, reduction, final_step, grad_mode, backprop, n, m = case
    noise = ChainNoise.draw(B, world.latent_shape, K, torch.Generator().manual_seed(2), dtype=F64)
    terms = K if final_step == "floor" else K - 1
    full_value, full_grad = _regulariser(world, noise, None, name, reduction, final_step, grad_mode, backprop)
    assert full_value.item() > 1e-4 and full_grad.abs().max().item() > 0
    values, grads = [], []
    for steps in itertools.combinations(range(terms), n):
        for rows in itertools.combinations(range(B), m):
            # the plan draw_reference_plan would give for this draw (its weight is the one under test)
            weight = draw_reference_plan_weight(terms, n, B, m)
            plan = D.ReferencePlan(terms, B, steps, None if m == B else torch.tensor(rows), weight)
            v, g = _regulariser(world, noise, plan, name, reduction, final_step, grad_mode, backprop)
            values.append(v)
            grads.append(g)
    assert len({tuple(g.tolist()) for g in grads}) > 1  # the single draws really differ
    torch.testing.assert_close(torch.stack(values).mean(), full_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack(grads).mean(0), full_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2])
def test_importance_draws_averaged_by_their_probabilities_equal_the_full_sum(world, n):
    """divergence_sampling importance: n steps with replacement from unequal p, weighted c_k / (n p_k): the
    probability-weighted average over every possible draw is the full sum, value and gradient."""
    noise = ChainNoise.draw(B, world.latent_shape, K, torch.Generator().manual_seed(2), dtype=F64)
    full_value, full_grad = _regulariser(world, noise, None, "kl", "per_dim", "floor", "full", None)
    probs = torch.tensor([0.1, 0.3, 0.6], dtype=F64)
    value, grad, total_p = 0.0, 0.0, 0.0
    for draw in itertools.product(range(K), repeat=n):
        p_draw = float(torch.prod(probs[list(draw)]))
        weights = {k: draw.count(k) / (n * float(probs[k])) for k in sorted(set(draw))}
        plan = D.ReferencePlan(K, B, tuple(weights), None, weights)
        v, g = _regulariser(world, noise, plan, "kl", "per_dim", "floor", "full", None)
        value, grad, total_p = value + p_draw * v, grad + p_draw * g, total_p + p_draw
    assert total_p == pytest.approx(1.0)
    torch.testing.assert_close(value, full_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-8, atol=1e-12)


def test_importance_plans_draw_from_the_given_probabilities_with_hansen_hurwitz_weights():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.15, 0.8], dtype=F64)
    plans = [D.draw_reference_plan(3, 4, 1, 1.0, gen, step_probs=probs) for _ in range(4000)]
    share = sum(p.steps == (2,) for p in plans) / len(plans)
    assert abs(share - 0.8) < 0.03
    assert all(p.weight_of(p.steps[0]) == pytest.approx(1 / float(probs[p.steps[0]])) for p in plans)
    two = D.draw_reference_plan(3, 4, 2, 1.0, torch.Generator().manual_seed(1), step_probs=torch.tensor([0.0, 0.0, 1.0]))
    assert two.steps == (2,) and two.weight_of(2) == pytest.approx(1.0)  # drawn twice: 2 / (2 * 1)


def test_step_importance_follows_the_measured_divergences_with_a_floor_and_resumes_exactly():
    imp = D.StepImportance(4)
    torch.testing.assert_close(imp.probs(), torch.full((4,), 0.25, dtype=F64))  # nothing measured: uniform
    imp.observe({0: 0.0, 1: 1.0, 2: 3.0})
    torch.testing.assert_close(imp.probs(), torch.full((4,), 0.25, dtype=F64))  # step 3 still unmeasured
    imp.observe({3: 0.0})
    p = imp.probs()
    assert p.sum().item() == pytest.approx(1.0) and p[0].item() == pytest.approx(0.25 / 4)
    assert p[2].item() == pytest.approx(0.75 * 3 / 4 + 0.25 / 4)
    again = D.StepImportance(4)
    again.load_state_dict(imp.state_dict())
    torch.testing.assert_close(again.probs(), p)


def draw_reference_plan_weight(terms, n, batch, m):
    """The weight draw_reference_plan assigns to an (n steps, m chains) draw."""
    plan = D.draw_reference_plan(terms, batch, n, m / batch if m < batch else 1.0, torch.Generator().manual_seed(0))
    assert len(plan.steps) == n and (plan.rows is None if m == batch else len(plan.rows) == m)
    return plan.weight_of(plan.steps[0])


def _counting(world, monkeypatch):
    """Rows of every network call, split into policy and reference calls."""
    calls = {"policy": [], "reference": []}
    original = DigitsWorld.consistency

    def consistency(self, x, t, cond, reference=False):
        calls["reference" if reference else "policy"].append(x.shape[0])
        return original(self, x, t, cond, reference)

    monkeypatch.setattr(DigitsWorld, "consistency", consistency)
    return calls


class Quadratic:
    name, differentiable = "quadratic", True

    def __call__(self, images, prompts):
        return -(images - 0.5).square().flatten(1).mean(1)


@pytest.mark.parametrize("n,fraction", [(1, 1.0), (2, 1.0), (1, 0.5)])
def test_one_rocm_step_calls_the_reference_on_n_steps_of_each_drawn_chain(world, monkeypatch, n, fraction):
    cfg = TrainConfig(num_steps=4, beta=1.0, divergence_steps=n, divergence_fraction=fraction, batch_size=4)
    batch = 4
    rocm = Rocm(cfg, world, Quadratic())
    calls = _counting(world, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    noise = ChainNoise.draw(batch, world.latent_shape, 4, gen, dtype=F64)
    loss, metrics, _ = rocm.loss([class_prompt(i) for i in range(batch)], noise, gen)
    loss.backward()
    m = batch if fraction == 1 else round(fraction * batch)
    assert calls["policy"] == [batch] * 4
    assert len(calls["reference"]) == n and sum(calls["reference"]) == n * m  # n calls, each on the m drawn chains
    drawn = [k for k in range(4) if metrics[f"div_{k + 1}"] is not None]
    assert len(drawn) == n and metrics["divergence"] > 0


def test_rocm_by_default_calls_the_reference_once_per_update_drawing_steps_by_importance(world, monkeypatch):
    calls = _counting(world, monkeypatch)
    rocm = Rocm(TrainConfig(num_steps=4, beta=1.0), world, Quadratic())
    assert rocm.divergence_steps == 1 and rocm.importance is not None
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        _, metrics, _ = rocm.loss(PROMPTS, ChainNoise.draw(B, world.latent_shape, 4, gen, dtype=F64), gen)
    assert calls["reference"] == [B] * 6
    assert not torch.isnan(rocm.importance.average).all()  # what it measured steers the next draws
    assert Dpok.divergence_steps(TrainConfig(method="dpok", beta=1.0)) == "all"  # dpok keeps every step
    assert Rocm.divergence_steps(TrainConfig(beta=0.0)) == "all"  # nothing to subsample at beta 0


def test_rocm_checkpoints_its_step_importance_so_a_resume_draws_the_same_steps(world):
    """Exact resume: the averages that steer the draws travel in the method state; a run without them is refused."""
    rocm = Rocm(TrainConfig(num_steps=4, beta=1.0), world, Quadratic())
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        rocm.loss(PROMPTS, ChainNoise.draw(B, world.latent_shape, 4, gen, dtype=F64), gen)
    assert not torch.isnan(rocm.importance.average).any()
    tensors, meta = rocm.state_dict()
    resumed = Rocm(TrainConfig(num_steps=4, beta=1.0), world, Quadratic())
    resumed.load_state_dict(tensors, meta)
    torch.testing.assert_close(resumed.importance.probs(), rocm.importance.probs())
    draws = [D.draw_reference_plan(4, B, 1, 1.0, torch.Generator().manual_seed(s), step_probs=m.importance.probs()).steps
             for m in (rocm, resumed) for s in range(20)]
    assert draws[:20] == draws[20:] and len(set(draws)) > 1
    with pytest.raises(UserError, match="step-importance"):
        Rocm(TrainConfig(num_steps=4, beta=1.0), world, Quadratic()).load_state_dict({}, {})


def test_divergence_steps_all_calls_every_step_and_skip_spares_the_final_reference(world, monkeypatch):
    calls = _counting(world, monkeypatch)
    for final, expected in (("floor", 4), ("skip", 3)):
        calls["reference"].clear()
        rocm = Rocm(TrainConfig(num_steps=4, beta=1.0, final_step=final, divergence_steps="all"), world, Quadratic())
        gen, alone = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        rocm.loss(PROMPTS, ChainNoise.draw(B, world.latent_shape, 4, gen, dtype=F64), gen)
        assert calls["reference"] == [B] * expected
        # the full plan draws no random numbers: runs without subsampling keep their random stream
        ChainNoise.draw(B, world.latent_shape, 4, alone, dtype=F64)
        assert torch.equal(gen.get_state(), alone.get_state())


def test_dpok_divergence_is_subsampled_the_same_way(world, monkeypatch):
    cfg = TrainConfig(method="dpok", num_steps=3, beta=0.5, divergence_steps=1, batch_size=B)
    dpok = Dpok(cfg, world, Quadratic())
    traj = run_chain(world, COND, ChainNoise.draw(B, world.latent_shape, 3, torch.Generator().manual_seed(3), dtype=F64),
                     world.timesteps(3))
    calls = _counting(world, monkeypatch)
    logp, div = dpok.evaluate_policy(COND, traj.states, torch.arange(B), torch.Generator().manual_seed(4))
    assert len(calls["reference"]) == 1 and sum(calls["reference"]) == B
    assert logp.shape == (B, 2) and div.shape == (B,) and div.sum().item() > 0
    with pytest.raises(ValueError, match="generator"):
        dpok.evaluate_policy(COND, traj.states, torch.arange(B))


def test_chains_are_drawn_on_the_global_batch_and_every_rank_keeps_its_own():
    """Two ranks of 3 chains with one seeded generator each select exactly the chains one process of 6 would."""
    single = D.draw_reference_plan(4, 6, 2, 0.5, torch.Generator().manual_seed(9))
    ranks = [D.draw_reference_plan(4, 3, 2, 0.5, torch.Generator().manual_seed(9), Shard(i, 2)) for i in range(2)]
    assert all(r.steps == single.steps and r.weights == single.weights for r in ranks)
    assert sorted(ranks[0].rows.tolist() + [i + 3 for i in ranks[1].rows.tolist()]) == single.rows.tolist()
    assert single.weight_of(single.steps[0]) == pytest.approx(4 / 2 * 6 / 3)
    again = D.draw_reference_plan(4, 6, 2, 0.5, torch.Generator().manual_seed(9))
    assert again.steps == single.steps and torch.equal(again.rows, single.rows)  # the run's generator decides


@pytest.mark.parametrize("changes,message", [
    (dict(divergence_steps=5), r"divergence_steps must be auto, all or in \[1, 4\]"),
    (dict(divergence_steps=4, final_step="skip"), r"in \[1, 3\]"),
    (dict(divergence_steps=0), "divergence_steps"),
    (dict(divergence_fraction=0.0), "divergence_fraction must be in"),
    (dict(divergence_steps=1, beta=0.0), "beta = 0"),
    (dict(divergence_steps=1, method="rlcm"), "rlcm does not have"),
    (dict(divergence_steps="all", divergence_sampling="uniform"), "evaluates every step"),
    (dict(beta=0.0, divergence_sampling="importance"), "evaluates every step"),
    (dict(method="dpok", beta=0.1, divergence_steps=1, divergence_sampling="importance"), "dpok draws its divergence steps uniform"),
])
def test_bad_subsampling_settings_are_one_line_errors(changes, message):
    with pytest.raises(UserError, match=message):
        validate(TrainConfig(**changes), check_rewards=False)


def test_divergence_steps_from_the_command_line_and_yaml():
    from cmalign.config import from_mapping

    assert from_mapping({"divergence_steps": 2}).divergence_steps == 2
    assert from_mapping({"divergence_steps": "all"}).divergence_steps == "all"
    with pytest.raises(UserError, match="divergence_steps"):
        from_mapping({"divergence_steps": "some"})
    validate(TrainConfig(divergence_steps=2, divergence_fraction=0.5), check_rewards=False)


# ----------------------------------------------------------------------------------------------
# The evaluation's method-independent distances to the base model and the held-out judge (frontier)
# ----------------------------------------------------------------------------------------------
def test_evaluation_scores_kl_and_distance_to_base_and_the_heldout_proxy():
    from helpers import tiny_config

    from cmalign.training.evaluation import evaluate
    from cmalign.rewards.registry import build_weighted, reward_context
    from cmalign.training.build import build_world
    from cmalign.worlds.digits.factory import pretrain_config_for
    from cmalign.worlds.digits import cache

    cfg = tiny_config(divergence="hellinger", divergence_reduction="joint", final_step="skip")
    cache.locate(pretrain_config_for(cfg), True, False)
    world = build_world(cfg)
    reward = build_weighted({"proxy": 1.0}, reward_context(world, cfg))
    prompts = [class_prompt(c) for c in (0, 3, 5, 7)]
    noise = ChainNoise.draw(4, world.latent_shape, cfg.num_steps, torch.Generator().manual_seed(0))
    base, _ = evaluate(world, reward, prompts, noise, cfg.num_steps, cfg)
    assert base["kl_to_base"].abs().max() == 0 and base["distance_to_base"].abs().max() == 0  # zero-effect adapter
    with torch.no_grad():
        for n, p in world.network.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    scores, images = evaluate(world, reward, prompts, noise, cfg.num_steps, cfg)
    traj = run_chain(world, world.encode_prompts(prompts), noise, world.timesteps(cfg.num_steps), with_reference=True)
    # KL / per_dim / floor whatever the run's divergence (here Hellinger, joint, skip)
    torch.testing.assert_close(scores["kl_to_base"], step_divergences(traj, "kl", "per_dim", "floor").sum(1))
    assert not torch.allclose(scores["kl_to_base"], scores["divergence"])
    base_images, _ = evaluate(world, reward, prompts, noise, cfg.num_steps, use_adapter=False)
    assert (scores["distance_to_base"] > 0).all()
    # the held-out judge: another proxy (other pairs, other seed), scored beside the training proxy
    assert scores["heldout_proxy"].shape == (4,) and not torch.allclose(scores["heldout_proxy"], scores["reward"])
    assert "kl_to_base" not in base_images and "heldout_proxy" in base_images
    # ddpo's world samples the DDPM teacher: no consistency-chain KL, but the sample distance and the same judge
    ddpo_cfg = dataclasses.replace(cfg, method="ddpo")
    teacher = build_world(ddpo_cfg)
    t_scores, _ = evaluate(teacher, reward, prompts, ChainNoise.draw(4, teacher.latent_shape, 3, torch.Generator().manual_seed(0)),
                           3, ddpo_cfg)
    assert "kl_to_base" not in t_scores and "distance_to_base" in t_scores
    torch.testing.assert_close(teacher.heldout_proxy().net[0].weight, world.heldout_proxy().net[0].weight)


def test_a_full_rollout_scored_with_a_chain_subsampling_plan_uses_the_drawn_chains_reference(world):
    """step_divergences on a trajectory whose reference ran on every chain, with a plan that draws some chains:
    entry (b, k) is weight * D_bk for the drawn chains (their own reference means), 0 for the others."""
    noise = ChainNoise.draw(B, world.latent_shape, K, torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        traj = run_chain(world, COND, noise, world.timesteps(K), with_reference=True)
        full = step_divergences(traj, "kl", "per_dim", "floor")
        rows = torch.tensor([0, 2])
        plan = D.ReferencePlan(K, B, tuple(range(K)), rows, weight=3.0)
        sub = step_divergences(traj, "kl", "per_dim", "floor", plan=plan)
    expected = torch.zeros_like(full)
    expected[rows] = 3.0 * full[rows]
    assert torch.allclose(sub, expected, rtol=1e-12, atol=0)
