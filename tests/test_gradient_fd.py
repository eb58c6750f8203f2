"""The reparameterised gradient of the full ROCM objective (DESIGN §2) against central finite
differences, in float64, on a tiny digits world with a non-zero LoRA:

    L(theta) = - mean_b r(softclamp(decode(x0_b))) + beta * mean_b sum_k D_k,   k = 1..K (final floor)

with divergence_grad="full" (the reference branch evaluated on the live x_k). Along random
directions v in LoRA-parameter space, <grad L, v> must equal (L(theta + h v) - L(theta - h v)) / 2h.
"stopgrad_ref" gives the same L but a different (biased) gradient when K > 1."""

from __future__ import annotations

import pytest
import torch

from cmalign import divergences as D
from cmalign.chain import ChainNoise, run_chain
from cmalign.config import TrainConfig
from cmalign.methods.rocm import Rocm, clamp_images
from cmalign.worlds.digits.world import DigitsWorld
from cmalign.worlds.digits.data import class_prompt
from cmalign.worlds.digits.nets import build_unet

K = 3
BETA = 0.5
H = 1e-6
F64 = torch.float64
COND = torch.tensor([3, 7])
PROMPTS = [class_prompt(3), class_prompt(7)]
DIVS = {"kl": {}, "js": {"estimator": "gauss_hermite"}, "hellinger": {}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearTanhReward:
    """A smooth differentiable reward: a fixed random linear map of the image, tanh, weighted sum."""

    name = "linear_tanh"
    differentiable = True

    def __init__(self, num_pixels: int = 64, width: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(num_pixels, width, generator=g, dtype=F64) / 4
        self.b = torch.randn(width, generator=g, dtype=F64) / 2
        self.a = torch.randn(width, generator=g, dtype=F64)

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        dt = images.dtype
        return torch.tanh(images.flatten(1) @ self.W.to(dt) + self.b.to(dt)) @ self.a.to(dt)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    world = DigitsWorld(build_unet("tiny"), resolution=8, device="cpu", lora_rank=4, lora_init=True)
    world.network.double()
    params = [p for n, p in world.network.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad and p.dtype == F64 for p in params)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the adapter's effect non-zero (lora_B starts at zero)
        for n, p in world.network.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    noise = ChainNoise.draw(2, world.latent_shape, K, torch.Generator().manual_seed(2), dtype=F64)
    assert noise.initial.dtype == F64 and all(s.dtype == F64 for s in noise.steps)
    return world, params, noise, LinearTanhReward()


def objective(world, noise, reward, name, divergence_grad="full"):
    """(L, reward term, divergence term), all float64; smooth clamp so finite differences are valid."""
    traj = run_chain(world, COND, noise, world.timesteps(K), with_reference=True, divergence_grad=divergence_grad)
    assert traj.x0.dtype == F64
    images = clamp_images(world.decode(traj.x0), "soft")
    reward_term = -reward(images).mean()
    per_step = torch.stack(
        [D.divergence(name, traj.means[k], traj.ref_means[k], traj.sigmas[k], "per_dim", **DIVS[name]) for k in range(K)],
        dim=1,
    )  # final_step = floor: all K steps
    assert per_step.dtype == F64 and per_step.shape == (2, K)
    div_term = BETA * per_step.sum(1).mean()
    return reward_term + div_term, reward_term, div_term


def directions(params, n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        out.append([x / norm for x in v])
    return out


def finite_difference(world, params, noise, reward, name, v, h=H):
    base = [p.detach().clone() for p in params]
    vals = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, p0, vi in zip(params, base, v):
                p.copy_(p0 + sign * h * vi)
            vals.append(torch.stack(objective(world, noise, reward, name)))
        for p, p0 in zip(params, base):
            p.copy_(p0)
    return (vals[0] - vals[1]) / (2 * h)  # for (L, reward term, divergence term)


def dot(grads, v):
    return sum((g * x).sum().item() for g, x in zip(grads, v))


@pytest.mark.parametrize("name", list(DIVS))
def test_full_objective_gradient_matches_central_differences(setup, name):
    world, params, noise, reward = setup
    L, r_term, d_term = objective(world, noise, reward, name)
    assert d_term.item() > 1e-4  # the adapter really moves the policy away from the reference
    g_total = torch.autograd.grad(L, params, retain_graph=True)
    g_reward = torch.autograd.grad(r_term, params, retain_graph=True)
    g_div = torch.autograd.grad(d_term, params)
    for v in directions(params):
        fd_total, fd_reward, fd_div = (x.item() for x in finite_difference(world, params, noise, reward, name, v))
        for ad, fd, what in ((dot(g_total, v), fd_total, "L"), (dot(g_reward, v), fd_reward, "reward"),
                             (dot(g_div, v), fd_div, "divergence")):
            assert abs(fd) > 1e-6, (what, fd)  # each term has a non-trivial slope along v
            assert abs(ad - fd) <= 1e-5 * abs(fd), (name, what, ad, fd, abs(ad - fd) / abs(fd))


@pytest.mark.parametrize("name", list(DIVS))
def test_stopgrad_ref_gives_a_biased_gradient(setup, name):
    world, params, noise, reward = setup
    L_full, _, d_full = objective(world, noise, reward, name, "full")
    L_sg, _, d_sg = objective(world, noise, reward, name, "stopgrad_ref")
    assert L_full.item() == pytest.approx(L_sg.item(), rel=1e-14, abs=1e-14)  # same value
    g_full = torch.autograd.grad(L_full, params, retain_graph=True)
    g_sg = torch.autograd.grad(L_sg, params, retain_graph=True)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_full, g_sg)))
    norm = torch.sqrt(sum((a**2).sum() for a in g_full))
    assert diff.item() > 1e-3 * norm.item(), (diff.item(), norm.item())
    # ... and the finite difference of the divergence term is matched by the full gradient only
    gd_full = torch.autograd.grad(d_full, params)
    gd_sg = torch.autograd.grad(d_sg, params)
    v = directions(params, n=1, seed=4)[0]
    fd = finite_difference(world, params, noise, reward, name, v)[2].item()
    assert abs(dot(gd_full, v) - fd) <= 1e-5 * abs(fd)
    assert abs(dot(gd_sg, v) - fd) > 1e-2 * abs(fd), (dot(gd_sg, v), fd)


@pytest.mark.parametrize("name", list(DIVS))
def test_rocm_loss_is_this_objective(setup, name):
    """Rocm.loss (which evaluates the reward and divergences in float32) agrees with the float64
    objective above in value and gradient, up to float32 precision."""
    world, params, noise, reward = setup
    cfg = TrainConfig(num_steps=K, beta=BETA, divergence=name, divergence_reduction="per_dim", final_step="floor",
                      divergence_grad="full", clamp="soft", reward_scale=1.0, backprop_steps=None,
                      grad_checkpointing=False, js_estimator="gauss_hermite", divergence_steps="all")  # the exact objective
    rocm = Rocm(cfg, world, reward)
    assert rocm.timesteps == world.timesteps(K)
    loss, metrics, images = rocm.loss(PROMPTS, noise)
    L, r_term, d_term = objective(world, noise, reward, name)
    assert loss.item() == pytest.approx(L.item(), rel=1e-5, abs=1e-6)
    assert metrics["loss"] == pytest.approx(L.item(), rel=1e-5, abs=1e-6)
    assert metrics["reward"] == pytest.approx(-r_term.item(), rel=1e-5, abs=1e-6)
    assert metrics["divergence"] == pytest.approx(d_term.item() / BETA, rel=1e-5, abs=1e-6)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    g_rocm = torch.autograd.grad(loss, params)
    g_ref = torch.autograd.grad(L, params)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_rocm, g_ref)))
    norm = torch.sqrt(sum((b**2).sum() for b in g_ref))
    assert diff.item() <= 1e-4 * norm.item(), (diff.item(), norm.item())
