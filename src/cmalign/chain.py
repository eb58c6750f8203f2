"""The fixed-noise K-step consistency chain (DESIGN §2): the single rollout core of every method.

    x_1 ~ N(0, I);  m_k = f_theta(x_k, t_k, c);  x_{k+1} = sqrt(abar_{k+1}) m_k + sqrt(1 - abar_{k+1}) eps_k
    output x0 = m_K

Step k < K is the Gaussian policy N(mu_k, s_k^2 I), mu_k = sqrt(abar_{k+1}) m_k, s_k^2 = 1 - abar_{k+1}.
The final step adds no noise; under `final_step: floor` it is treated as N(m_K, (1 - abar_K) I).

The per-step update is a small pure `Transition` (what the network call returns, and the Gaussian
mean/sigma of the next state). The default is the consistency update above; `DDIMTransition` makes
the same loop a DDIM(eta) sampler of a diffusion model (DDPO's MDP), for worlds that set
`world.transition`. Passing `states=` re-evaluates the policy on stored states (PPO's inner epochs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from cmalign import divergences as D
from cmalign.schedule import predicted_x0
from cmalign.training.distributed import SINGLE, Shard

FINAL_STEP_MODES = ("floor", "skip")
DIVERGENCE_GRADS = ("full", "stopgrad_ref")


@dataclass
class ChainNoise:
    """All randomness of one rollout: the initial latent and the K-1 step noises."""

    initial: torch.Tensor
    steps: list[torch.Tensor]

    @staticmethod
    def draw(batch: int, latent_shape, num_steps: int, generator: torch.Generator, device="cpu", dtype=torch.float32,
             shard: Shard = SINGLE):
        """Drawn in sampling order from one generator: the same order as LCMScheduler's sampler.
        With a shard of N ranks the global batch of batch * N chains is drawn and this rank's slice kept."""
        shape = (batch * shard.count, *latent_shape)
        initial = torch.randn(shape, generator=generator, dtype=dtype)
        steps = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(num_steps - 1)]
        return ChainNoise(shard.take(initial, batch).to(device), [shard.take(s, batch).to(device) for s in steps])


class ConsistencyTransition:
    """The consistency chain: m_k = f(x_k, t_k, c); mean = sqrt(abar_next) m_k, sigma^2 = 1 - abar_next."""

    def denoise(self, world, x, t, cond, reference):
        return world.consistency(x, t, cond, reference)

    def step(self, x, m, t, t_next, abar):
        a_next = abar[t_next]
        return float(a_next.sqrt()) * m, float((1 - a_next).sqrt())

    def timesteps(self, world, num_steps):
        return None  # the world's own (LCM) grid


class DDIMTransition:
    """DDIM(eta) on a diffusion model (DDPO): m_k is the predicted x0; with eps = (x - sqrt(a_t) m) / sqrt(1 - a_t),
    sigma_k = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) and
    mean_k = sqrt(a_prev) m + sqrt(1 - a_prev - sigma_k^2) eps. The last step goes to a_prev = 1, i.e. outputs m_K
    (deterministic, like the consistency chain's last step). Timesteps: diffusers' "trailing" spacing."""

    def __init__(self, eta: float = 1.0):
        self.eta = eta

    def denoise(self, world, x, t, cond, reference):
        with world.reference_policy() if reference else contextlib.nullcontext():
            out = world.model_output(x, t, cond)
        abar_t = world.alphas_cumprod[t].to(device=x.device, dtype=x.dtype)
        return predicted_x0(x, out.to(x.dtype), abar_t, world.prediction_type)

    def step(self, x, m, t, t_next, abar):
        a_t, a_prev = float(abar[t]), float(abar[t_next])
        eps = (x - a_t**0.5 * m) / (1 - a_t) ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        return a_prev**0.5 * m + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps, sigma

    def timesteps(self, world, num_steps):
        stride = world.num_train_timesteps / num_steps
        return [int(round(world.num_train_timesteps - i * stride)) - 1 for i in range(num_steps)]


CONSISTENCY = ConsistencyTransition()


@dataclass
class Trajectory:
    timesteps: list[int]
    states: list[torch.Tensor]  # x_1..x_K, the input of each network call
    means: list[torch.Tensor]  # mu_1..mu_K of the policy (mu_K = m_K)
    sigmas: list[float]  # s_1..s_K (s_K the floor of the final step)
    ref_means: list[torch.Tensor | None] | None = None  # None at a step without reference call
    ref_rows: list[torch.Tensor | None] | None = None  # the chains of each ref_means entry (None: all)
    x0: torch.Tensor | None = None  # m_K: the chain's output in latent space
    grad_steps: list[bool] = field(default_factory=list)  # which steps carry gradient

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def run_chain(
    world,
    cond: Any,
    noise: ChainNoise,
    timesteps: list[int],
    *,
    with_reference: bool = False,
    divergence_grad: str = "full",
    backprop_steps: int | None = None,
    grad_checkpointing: bool = False,
    states: list[torch.Tensor] | None = None,
    reference_rows: list[torch.Tensor | None] | None = None,
) -> Trajectory:
    """Roll the chain out with the noise held fixed, so the output is a differentiable function of theta.

    backprop_steps < K runs the first K - backprop_steps steps without gradient (DRaFT-K truncation);
    with_reference also evaluates f_ref on each state (on the live state for divergence_grad="full",
    on a detached one under no_grad for "stopgrad_ref"). `states` (x_1..x_n, n <= K, e.g. a stored rollout)
    re-evaluates the policy on those states instead of sampling (noise may then be None); the
    trajectory then holds n steps (x0 only when n = K). `reference_rows` (with_reference; one entry per step:
    None = every chain, a LongTensor = those chains, empty = no call) restricts the reference calls to the
    steps and chains a subsampled regulariser draws (divergences.ReferencePlan); ref_means[k] then holds
    only those rows (None where nothing was called).
    """
    num_steps = len(timesteps)
    backprop_steps = _checked_backprop_steps(num_steps, backprop_steps, divergence_grad)
    steps = _ChainSteps(world, cond, timesteps, divergence_grad, grad_checkpointing)
    # a transition with its own x_1 (the distilled samplers': Euler's scaled input) maps the N(0, I) draw
    initial = getattr(steps.transition, "initial_state", None)
    x = (noise.initial if initial is None else initial(noise.initial, num_steps)) if states is None else states[0]
    traj = Trajectory(timesteps=list(timesteps), states=[], means=[], sigmas=[], ref_means=[] if with_reference else None,
                      ref_rows=[] if with_reference else None)
    for k, t in enumerate(timesteps):
        if states is not None:
            if k >= len(states):
                break
            x = states[k]
        live = steps.grad_on and k >= num_steps - backprop_steps
        x = x if live else x.detach()
        traj.states.append(x)
        traj.grad_steps.append(live)
        with torch.set_grad_enabled(live):
            m = steps.call(x, t, reference=False)
        if with_reference:
            rows = reference_rows[k] if reference_rows is not None else None
            traj.ref_rows.append(rows)
            x_ref, m_ref = steps.reference(x, t, rows, live)
        mean, sigma = steps.policy(k, x, m)
        traj.means.append(mean)
        traj.sigmas.append(steps.regularised_sigma(k, sigma))
        if with_reference:
            traj.ref_means.append(None if m_ref is None else steps.policy(k, x_ref, m_ref)[0])
        if k == num_steps - 1:
            traj.x0 = m
        elif states is None:
            x = mean + sigma * noise.steps[k]
    return traj


def _checked_backprop_steps(num_steps: int, backprop_steps: int | None, divergence_grad: str) -> int:
    if divergence_grad not in DIVERGENCE_GRADS:
        raise ValueError(f"unknown divergence_grad {divergence_grad!r}; expected one of {DIVERGENCE_GRADS}")
    backprop_steps = num_steps if backprop_steps is None else backprop_steps
    if not 0 <= backprop_steps <= num_steps:
        raise ValueError(f"backprop_steps must be in [0, K={num_steps}], got {backprop_steps}")
    return backprop_steps


class _ChainSteps:
    """The network calls and per-step Gaussians of one rollout (run_chain's loop body, step by step)."""

    def __init__(self, world, cond, timesteps, divergence_grad: str, grad_checkpointing: bool):
        self.world, self.cond, self.timesteps = world, cond, timesteps
        self.divergence_grad, self.grad_checkpointing = divergence_grad, grad_checkpointing
        self.transition = getattr(world, "transition", None) or CONSISTENCY
        self.abar = world.alphas_cumprod
        self.grad_on = torch.is_grad_enabled()

    def call(self, x, t, reference: bool, cond=None):
        cond = self.cond if cond is None else cond
        if self.grad_checkpointing and self.grad_on and torch.is_grad_enabled():
            return checkpoint(self.transition.denoise, self.world, x, t, cond, reference, use_reentrant=False)
        return self.transition.denoise(self.world, x, t, cond, reference)

    def reference(self, x, t, rows, live: bool):
        """(x_ref, m_ref) of the chains rows (None: all; empty: no call, m_ref None): only the drawn chains pay
        for a reference call; on the live state under divergence_grad full, else detached without gradient."""
        if rows is not None and rows.numel() == 0:
            return None, None
        x_ref, c_ref = (x, self.cond) if rows is None else (x[rows.to(x.device)], index_cond(self.cond, rows.to(x.device)))
        if live and self.divergence_grad == "full":
            return x_ref, self.call(x_ref, t, True, c_ref)
        with torch.no_grad():
            return x_ref, self.call(x_ref.detach(), t, True, c_ref)

    def policy(self, k: int, x, m):
        """(mean, sigma) of step k's Gaussian; the noiseless final step is N(m_K, (1 - abar_K) I), the floor."""
        t = self.timesteps[k]
        if k == len(self.timesteps) - 1:
            final = getattr(self.transition, "final_sigma", None)  # continuous-time chains (SCM) have no abar[t]
            return m, float((1 - self.abar[t]).sqrt()) if final is None else final(t, self.abar)
        return self.transition.step(x, m, t, self.timesteps[k + 1], self.abar)

    def regularised_sigma(self, k: int, sigma: float) -> float:
        """The sigma the divergence uses: a deterministic step (TCD at gamma 0) is regularised like the final one."""
        if sigma == 0 and k < len(self.timesteps) - 1 and hasattr(self.transition, "sigma_floor"):
            return self.transition.sigma_floor(self.timesteps[k], self.timesteps[k + 1], self.abar)
        return sigma


def index_cond(cond, idx: torch.Tensor):
    """The conditioning of the chains idx (a tensor, or a dataclass of tensors such as the lcm world's)."""
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    if dataclasses.is_dataclass(cond):
        return dataclasses.replace(cond, **{f: index_cond(getattr(cond, f), idx)
                                            for f in cond.__dataclass_fields__ if isinstance(getattr(cond, f), torch.Tensor)})
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Divergences in float32 for half-precision chains, float64 kept for float64 ones."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def step_divergences(
    traj: Trajectory,
    name: str = "kl",
    reduction: str = "per_dim",
    final_step: str = "floor",
    plan: D.ReferencePlan | None = None,
    **kwargs,
) -> torch.Tensor:
    """Per-step divergences D_k of policy to reference, shape (B, K) (K - 1 columns under `skip`).

    With a subsampling `plan` (the one the trajectory was rolled out with) entry (b, k) is plan.weight_of(k) * D_bk
    for the drawn steps and chains and 0 elsewhere, so that .sum(1).mean() is the unbiased estimator of the
    full regulariser (divergences.ReferencePlan)."""
    if traj.ref_means is None:
        raise ValueError("the trajectory was rolled out without the reference branch")
    if final_step not in FINAL_STEP_MODES:
        raise ValueError(f"unknown final_step {final_step!r}; expected one of {FINAL_STEP_MODES}")
    n = traj.num_steps if final_step == "floor" else traj.num_steps - 1
    batch, device = traj.states[0].shape[0], traj.states[0].device
    if plan is not None and plan.num_terms != n:
        raise ValueError(f"the plan covers {plan.num_terms} terms, the trajectory has {n} under final_step {final_step!r}")
    cols = []
    for k in range(n):
        if plan is not None and k not in plan.steps:
            cols.append(torch.zeros(batch, device=device))
            continue
        rolled = traj.ref_rows[k] if traj.ref_rows else None
        ref = traj.ref_means[k]
        if ref is None:
            raise ValueError(f"step {k + 1} was rolled out without a reference call")
        rows = plan.rows if plan is not None else rolled
        if rows is not None and rolled is None:
            ref = ref[rows.to(device)]  # a full rollout scored with a chain-subsampling plan
        elif rows is not None and not torch.equal(rows.cpu(), rolled.cpu()):
            raise ValueError("the plan's chains are not the ones the trajectory called the reference on")
        mean = traj.means[k] if rows is None else traj.means[k][rows.to(device)]
        col = D.divergence(name, _at_least_fp32(mean), _at_least_fp32(ref), traj.sigmas[k], reduction, **kwargs)
        if plan is not None:
            col = col * plan.weight_of(k)
        if rows is not None:  # scatter the drawn chains' terms into the batch (differentiable)
            col = torch.zeros(batch, device=device, dtype=col.dtype).index_copy(0, rows.to(device), col)
        cols.append(col)
    if not cols:
        return torch.zeros(batch, 0, device=device)
    dtype = functools.reduce(torch.promote_types, [c.dtype for c in cols])
    return torch.stack([c.to(dtype) for c in cols], dim=1)


@torch.no_grad()
def generate(world, prompts: list[str], num_steps: int, generator: torch.Generator, batch_size: int = 256,
             reference: bool = False) -> torch.Tensor:
    """Images in [0, 1] (hard-clamped) for each prompt, in batches, with the adapter on or off."""
    out = []
    timesteps = world.timesteps(num_steps)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        noise = ChainNoise.draw(len(chunk), world.latent_shape, num_steps, generator, world.device, world.dtype)
        cond = world.encode_prompts(chunk)
        with world.reference_policy() if reference else contextlib.nullcontext():
            traj = run_chain(world, cond, noise, timesteps)
        out.append(world.decode(traj.x0).float().clamp(0, 1))
    return torch.cat(out)
