"""The schedule helpers against diffusers' LCMScheduler, and the fixed-noise chain (DESIGN §2):
exact agreement with the plain LCM sampler at a zero-effect adapter, the reference branch,
truncated back-propagation, stop-gradient of the reference and gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import LCMScheduler

from cmalign import divergences as D
from cmalign import schedule
from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.worlds.digits.world import DigitsWorld
from cmalign.worlds.digits.nets import build_unet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny LoRA UNet is ~100x slower with 2 OpenMP threads on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_world(seed: int = 0, lora_init=True, with_base: bool = False):
    """A tiny DigitsWorld (rank-4 LoRA); optionally a separate LoRA-free copy of the base network
    built from the same state dict before the adapter is injected."""
    torch.manual_seed(seed)
    net = build_unet("tiny")
    base = None
    if with_base:
        base = build_unet("tiny")
        base.load_state_dict(net.state_dict())
    world = DigitsWorld(net, resolution=8, device="cpu", lora_rank=4, lora_init=lora_init)
    return (world, base) if with_base else world


def lora_params(world):
    params = [p for n, p in world.network.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    assert world.trainable_parameters() == params
    return params


COND = torch.tensor([3, 7])


def draw(world, k, seed=0, batch=2, dtype=torch.float32):
    return ChainNoise.draw(batch, world.latent_shape, k, torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 50])
def test_lcm_timesteps_equal_diffusers_grid(k):
    sched = LCMScheduler(original_inference_steps=50)
    sched.set_timesteps(k)
    expected = [int(t) for t in sched.timesteps]
    got = schedule.lcm_timesteps(k)
    assert got == expected
    assert len(got) == k and got[0] == 999 and all(a > b for a, b in zip(got, got[1:]))
    assert all(isinstance(t, int) for t in got)


def test_lcm_timesteps_rejects_bad_counts():
    for k in (0, -1, 51):
        with pytest.raises(ValueError):
            schedule.lcm_timesteps(k)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_lcm_scheduler(beta_schedule):
    abar = schedule.alphas_cumprod(beta_schedule)
    sched = LCMScheduler(beta_schedule=beta_schedule)
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert torch.equal(abar.float(), sched.alphas_cumprod.float())
    # a copy each time: callers cannot corrupt the cache
    abar[0] = -1
    assert schedule.alphas_cumprod(beta_schedule)[0] > 0


@pytest.mark.parametrize("t", [0, 1, 19, 139, 259, 499, 759, 999])
def test_boundary_scalings_match_lcm_scheduler(t):
    sched = LCMScheduler()
    c_skip_ref, c_out_ref = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    c_skip, c_out = schedule.boundary_scalings(t)
    assert float(c_skip) == pytest.approx(float(c_skip_ref), rel=1e-6, abs=1e-12)
    assert float(c_out) == pytest.approx(float(c_out_ref), rel=1e-6, abs=1e-12)
    # hand formula, sigma_data = 0.5, timestep scaling 10
    s = 10.0 * t
    assert float(c_skip) == pytest.approx(0.25 / (s * s + 0.25), rel=1e-12)
    assert float(c_out) == pytest.approx(s / math.sqrt(s * s + 0.25), rel=1e-12)


def test_boundary_condition_at_zero():
    c_skip, c_out = schedule.boundary_scalings(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    x = torch.randn(2, 1, 4, 4)
    out = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(schedule.consistency_function(x, out, 0, 0.99, "v_prediction"), x)


def test_predicted_x0_hand_formulas():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    a = 0.37
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    torch.testing.assert_close(schedule.predicted_x0(x, out, a, "epsilon"), (x - sb * out) / sa)
    torch.testing.assert_close(schedule.predicted_x0(x, out, a, "v_prediction"), sa * x - sb * out)
    assert torch.equal(schedule.predicted_x0(x, out, a, "sample"), out)
    with pytest.raises(ValueError):
        schedule.predicted_x0(x, out, a, "x_start")
    # round trips through the forward process and the v target
    x0, eps = torch.randn_like(x), torch.randn_like(x)
    abar = torch.full((3,), a, dtype=torch.float64)
    xt = schedule.add_noise(x0, eps, abar)
    torch.testing.assert_close(xt, sa * x0 + sb * eps)
    torch.testing.assert_close(schedule.predicted_x0(xt, eps, a, "epsilon"), x0)
    torch.testing.assert_close(schedule.predicted_x0(xt, schedule.v_target(x0, eps, abar), a, "v_prediction"), x0)
    # f = c_skip x + c_out x0_pred
    c_skip, c_out = schedule.boundary_scalings(259)
    torch.testing.assert_close(
        schedule.consistency_function(x, out, 259, a, "v_prediction"),
        float(c_skip) * x + float(c_out) * (sa * x - sb * out),
    )


# ----------------------------------------------------------------------------------------------
# the chain reproduces diffusers' LCM sampler at a zero-effect adapter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_chain_with_fresh_lora_reproduces_lcm_sampler(k):
    world, base = make_world(seed=1, with_base=True)
    assert world.prediction_type == "v_prediction"
    seed = 1234 + k
    noise = draw(world, k, seed)
    with torch.no_grad():
        traj = run_chain(world, COND, noise, world.timesteps(k))

    sched = LCMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", original_inference_steps=50)
    sched.set_timesteps(k)
    assert [int(t) for t in sched.timesteps] == traj.timesteps
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *world.latent_shape), generator=gen)
    assert torch.equal(x, noise.initial)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            assert torch.allclose(x, traj.states[i], atol=1e-6, rtol=0)
            out = base(x, t, class_labels=COND).sample
            x, denoised = sched.step(out, t, x, generator=gen, return_dict=False)
    assert traj.x0.shape == denoised.shape
    assert (traj.x0 - denoised).abs().max() < 1e-6
    assert traj.x0.abs().max() > 0.1  # not trivially zero


# ----------------------------------------------------------------------------------------------
# reference branch, per-step policies and divergences
# ----------------------------------------------------------------------------------------------
def test_reference_branch_at_zero_effect_and_nonzero_adapter():
    k = 4
    zero = make_world(seed=2)
    noise = draw(zero, k, seed=5)
    ts = zero.timesteps(k)
    traj = run_chain(zero, COND, noise, ts, with_reference=True)
    assert len(traj.ref_means) == len(traj.means) == k
    for m, r in zip(traj.means, traj.ref_means):
        assert torch.equal(m, r)
    for name in D.DIVERGENCES:
        for red in ("per_dim", "joint"):
            dk = step_divergences(traj, name, red, "floor")
            assert dk.shape == (2, k)
            assert dk.abs().max() < 1e-10, (name, red)

    live = make_world(seed=2, lora_init=False)  # nn default init of A and B: a non-zero effect
    traj2 = run_chain(live, COND, noise, ts, with_reference=True)
    # the reference branch of the live world is the same base network as the zero-effect policy
    for r2, m in zip(traj2.ref_means[:1], traj.means[:1]):
        assert torch.allclose(r2, m, atol=1e-6)
    for m, r in zip(traj2.means, traj2.ref_means):
        assert (m - r).abs().max() > 1e-3
    floor = step_divergences(traj2, "kl", "per_dim", "floor")
    skip = step_divergences(traj2, "kl", "per_dim", "skip")
    assert floor.shape == (2, k) and skip.shape == (2, k - 1)
    assert (floor > 0).all()
    torch.testing.assert_close(skip, floor[:, : k - 1])
    # each column is the divergence of the step's Gaussians with the step's sigma
    for j in range(k):
        torch.testing.assert_close(floor[:, j], D.kl(traj2.means[j], traj2.ref_means[j], traj2.sigmas[j]))
    # JS kwargs pass through
    js = step_divergences(traj2, "js", "joint", "floor", estimator="gauss_hermite")
    assert js.shape == (2, k) and (js > 0).all() and (js <= math.log(2)).all()


def test_trajectory_means_sigmas_and_final_floor():
    k = 4
    world = make_world(seed=3, lora_init=False)
    noise = draw(world, k, seed=6)
    ts = world.timesteps(k)
    abar = world.alphas_cumprod
    traj = run_chain(world, COND, noise, ts)
    assert traj.num_steps == k and traj.timesteps == ts and len(traj.states) == k
    assert traj.states[0] is noise.initial or torch.equal(traj.states[0], noise.initial)
    for j in range(k - 1):
        a_next = abar[ts[j + 1]]
        assert traj.sigmas[j] == pytest.approx(float((1 - a_next).sqrt()), rel=1e-12)
        # x_{k+1} = mu_k + s_k eps_k
        torch.testing.assert_close(traj.states[j + 1], traj.means[j] + traj.sigmas[j] * noise.steps[j])
        # mu_k = sqrt(abar_{k+1}) f(x_k, t_k)
        with torch.no_grad():
            f = world.consistency(traj.states[j], ts[j], COND)
        torch.testing.assert_close(traj.means[j].detach(), float(a_next.sqrt()) * f)
    assert traj.sigmas[-1] == pytest.approx(float((1 - abar[ts[-1]]).sqrt()), rel=1e-12)
    assert traj.x0 is traj.means[-1]
    # K = 1: the only step is the final one, floored at sqrt(1 - abar_999)
    one = run_chain(world, COND, draw(world, 1), world.timesteps(1), with_reference=True)
    assert one.sigmas == [pytest.approx(float((1 - abar[999]).sqrt()), rel=1e-12)]
    assert step_divergences(one, "kl", final_step="floor").shape == (2, 1)
    assert step_divergences(one, "kl", final_step="skip").shape == (2, 0)


def test_step_divergences_errors():
    world = make_world(seed=0)
    traj = run_chain(world, COND, draw(world, 2), world.timesteps(2))
    with pytest.raises(ValueError):
        step_divergences(traj)  # no reference branch
    traj = run_chain(world, COND, draw(world, 2), world.timesteps(2), with_reference=True)
    with pytest.raises(ValueError):
        step_divergences(traj, final_step="drop")
    with pytest.raises(ValueError):
        run_chain(world, COND, draw(world, 2), world.timesteps(2), divergence_grad="none")


# ----------------------------------------------------------------------------------------------
# truncated back-propagation
# ----------------------------------------------------------------------------------------------
def test_backprop_steps_truncates_the_graph():
    k = 4
    world = make_world(seed=4, lora_init=False)
    params = lora_params(world)
    noise = draw(world, k, seed=7)
    ts = world.timesteps(k)
    traj = run_chain(world, COND, noise, ts, backprop_steps=2, with_reference=True)
    assert traj.grad_steps == [False, False, True, True]
    assert traj.states[0].grad_fn is None and traj.states[1].grad_fn is None
    assert traj.means[0].grad_fn is None and traj.means[1].grad_fn is None
    assert traj.means[2].grad_fn is not None and traj.means[3].grad_fn is not None
    assert traj.states[3].grad_fn is not None
    grads = torch.autograd.grad(traj.x0.square().sum(), params, allow_unused=True)
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # same forward values as the untruncated chain
    full = run_chain(world, COND, noise, ts)
    assert full.grad_steps == [True] * k
    torch.testing.assert_close(traj.x0, full.x0, rtol=0, atol=0)
    # truncation changes the gradient (earlier steps no longer contribute)
    gfull = torch.autograd.grad(full.x0.square().sum(), params)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(grads, gfull))
    assert diff > 1e-6

    none = run_chain(world, COND, noise, ts, backprop_steps=0, with_reference=True)
    assert none.grad_steps == [False] * k
    assert not none.x0.requires_grad
    assert all(not m.requires_grad for m in none.means + none.ref_means)
    with pytest.raises(ValueError):
        run_chain(world, COND, noise, ts, backprop_steps=k + 1)
    with pytest.raises(ValueError):
        run_chain(world, COND, noise, ts, backprop_steps=-1)


def test_no_grad_context_gives_no_graph():
    world = make_world(seed=4, lora_init=False)
    with torch.no_grad():
        traj = run_chain(world, COND, draw(world, 3), world.timesteps(3), with_reference=True, grad_checkpointing=True)
    assert traj.grad_steps == [False] * 3 and not traj.x0.requires_grad


# ----------------------------------------------------------------------------------------------
# divergence_grad
# ----------------------------------------------------------------------------------------------
def test_divergence_grad_stopgrad_ref_vs_full():
    k = 3
    world = make_world(seed=5, lora_init=False)
    noise = draw(world, k, seed=8)
    ts = world.timesteps(k)
    sg = run_chain(world, COND, noise, ts, with_reference=True, divergence_grad="stopgrad_ref")
    full = run_chain(world, COND, noise, ts, with_reference=True, divergence_grad="full")
    assert all(r.grad_fn is None and not r.requires_grad for r in sg.ref_means)
    # the first state is pure noise; from step 2 on the reference sees the live state x_k(theta)
    assert all(r.grad_fn is not None for r in full.ref_means[1:])
    for a, b in zip(sg.ref_means, full.ref_means):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    # the policy branch carries gradient under both
    assert all(m.grad_fn is not None for m in sg.means)


# ----------------------------------------------------------------------------------------------
# gradient checkpointing
# ----------------------------------------------------------------------------------------------
def test_grad_checkpointing_same_values_and_gradients(monkeypatch):
    import cmalign.chain as chain_module

    calls = []
    real_checkpoint = chain_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(chain_module, "checkpoint", counting_checkpoint)
    k = 3
    world = make_world(seed=6, lora_init=False)
    params = lora_params(world)
    noise = draw(world, k, seed=9)
    ts = world.timesteps(k)
    results = []
    for ckpt in (False, True):
        traj = run_chain(world, COND, noise, ts, with_reference=True, grad_checkpointing=ckpt)
        loss = traj.x0.square().mean() + step_divergences(traj, "kl").sum()
        grads = torch.autograd.grad(loss, params)
        results.append((traj, grads))
    (a, ga), (b, gb) = results
    assert len(calls) == 2 * k  # policy and reference call of every step went through checkpoint
    torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=0)
    for m, r in zip(b.means, b.ref_means):
        assert m.grad_fn is not None
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in ga) > 0
