"""Hybrid ROCM: rewards with non-differentiable terms (DESIGN §2, "Non-differentiable rewards").

Write the training reward r = r_d + r_n, where r_d is the weighted sum of the components whose
`differentiable` flag is true and r_n the sum of the others. ROCM's loss becomes

    L = - reward_scale * mean_b [ r_d(x0_b)  +  (r_n(x0_b) - b_b) * sum_{k<K} log pi_theta(sg x_{k+1} | sg x_k, c_b) ]
        + beta * mean_b sum_k D_k

with sg = stop-gradient, pi_theta(x_{k+1} | x_k, c) = N(mu_theta(x_k), s_k^2 I) the chain's step Gaussian
(log-density summed over every latent dimension: the joint density, so that the estimate is of grad
E[r_n] itself, not of a dimension-scaled copy) and b_b a baseline. What each part estimates:

- r_d and the divergence keep ROCM's reparameterised gradient (through the live chain, as before).
- The second term is the score-function (likelihood-ratio) estimator. The fixed-noise rollout is a
  sample of the chain's Gaussians (x_{k+1} = mu_k + s_k eps_k with eps_k ~ N(0, I) independent of
  theta), so the same rollout serves both estimators. The log-probabilities are re-evaluated on the
  detached states (one extra network call per stochastic step, with gradient): mu_k of the rollout
  itself depends on x_k, which carries gradient through the earlier steps, and that path does not
  belong to the score.
- Baseline (`score_baseline`): `loo` subtracts, for each chain, the mean r_n of the *other* chains of
  the same prompt in the batch (a prompt drawn once: of all other chains in the batch). It does not
  depend on the chain it is subtracted from, so E[b_b grad log p(chain b)] = 0 and the estimate stays
  unbiased; it lowers the variance (measured in tests/test_hybrid.py). `none` subtracts nothing.
  The advantages are deliberately not divided by their standard deviation (RLCM/DDPO do): that
  would bias the estimate and change the reward's scale against beta and against r_d.

What is unbiased and what is not. The last step is noiseless (x0 = m_K = f_theta(x_K)): it has no
log-probability, so r_n's dependence on theta through the final network call is **dropped**, as RLCM
does. The estimate is therefore the unbiased gradient of E[r_n] with respect to the parameters as
used in steps 1..K-1 only (the final call held fixed) — biased for the full gradient. We do not treat
the final step as the Gaussian N(m_K, (1 - abar_K) I) of the divergence's floor: its score is zero at
its own mean, so it would only act if the reward were scored on a re-noised output x0 + s eps, which
is a different (noisier) objective than the one the model is used for; for a piecewise-constant r_n
the missing term is a surface integral that no per-sample estimator recovers. The size of the dropped
part is measured on a Gaussian chain in tests/test_hybrid.py. With K = 1 there is no stochastic step
at all, and such a run is refused. With backprop_steps < K the pathwise terms are truncated as
usual; the score term still uses every stochastic step.
"""

from __future__ import annotations

from typing import Any

import torch

from cmalign.chain import run_chain
from cmalign.errors import UserError

SCORE_BASELINES = ("loo", "none")


def is_differentiable(reward: Any) -> bool:
    return bool(getattr(reward, "differentiable", True))


def split_reward(reward: Any) -> tuple[Any | None, Any | None]:
    """(differentiable part, non-differentiable part) of a reward: each a WeightedReward over its
    components (None when empty). A plain reward is one component."""
    from cmalign.rewards.registry import WeightedReward

    if isinstance(reward, WeightedReward):
        parts = []
        for keep in (True, False):
            names = [n for n, r in reward.rewards.items() if is_differentiable(r) == keep]
            parts.append(WeightedReward({n: reward.rewards[n] for n in names}, {n: reward.weights[n] for n in names})
                         if names else None)
        return parts[0], parts[1]
    return (reward, None) if is_differentiable(reward) else (None, reward)


def leave_one_out_baseline(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """For each chain the mean reward of the other chains of its prompt; for a prompt drawn once, of
    all other chains in the batch (0 for a batch of one). Never uses the chain's own reward."""
    r = rewards.detach()
    out = torch.zeros_like(r)
    n = len(prompts)
    total = r.sum()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        ix = torch.tensor(idx, device=r.device)
        if len(idx) > 1:
            out[ix] = (r[ix].sum() - r[ix]) / (len(idx) - 1)
        elif n > 1:
            out[ix] = (total - r[ix]) / (n - 1)
    return out


def chain_logprob(world, cond, traj, timesteps: list[int], grad_checkpointing: bool = False) -> torch.Tensor:
    """(B,) sum over the stochastic steps k < K of log N(sg x_{k+1}; mu_theta(sg x_k), s_k^2 I), summed over
    dimensions, up to a constant, with gradient through mu_theta only (the policy re-evaluated on the
    detached states)."""
    num = traj.num_steps
    if num < 2:
        raise ValueError("the chain has no stochastic step (K = 1)")
    states = [s.detach() for s in traj.states]
    policy = run_chain(world, cond, None, timesteps, states=states[: num - 1], grad_checkpointing=grad_checkpointing)
    total = 0.0
    for k in range(num - 1):
        sigma = policy.sigmas[k]
        dtype = torch.promote_types(policy.means[k].dtype, torch.float32)  # float32 at least (half-precision chains)
        z = (states[k + 1].to(dtype) - policy.means[k].to(dtype)) / sigma
        total = total + (-0.5 * z**2).flatten(1).sum(1)  # the constant -log(sigma sqrt(2 pi)) has no gradient
    return total


class HybridObjective:
    """The reward part of ROCM's objective when some reward components are not differentiable."""

    def __init__(self, reward: Any, timesteps: list[int], baseline: str = "loo", grad_checkpointing: bool = False):
        if baseline not in SCORE_BASELINES:
            raise UserError(f"score_baseline must be one of {', '.join(SCORE_BASELINES)}, got {baseline!r}")
        if len(timesteps) < 2:
            raise UserError("rocm with a non-differentiable reward needs K >= 2: its gradient comes from the "
                            "stochastic steps, and K = 1 has none (use a differentiable reward, or more steps)")
        self.reward, self.timesteps, self.baseline = reward, timesteps, baseline
        self.grad_checkpointing = grad_checkpointing
        self.differentiable, self.nondifferentiable = split_reward(reward)

    def __call__(self, world, traj, cond, images: torch.Tensor, prompts: list[str]):
        """(total reward (B,) without gradient, a surrogate whose value is mean r and whose gradient estimates
        grad E[r] as above, metrics).
        images: the decoded, clamped chain output (with gradient, for the differentiable terms)."""
        parts, components = [], {}
        surrogate = images.new_zeros(())
        if self.differentiable is not None:
            r_d = self.differentiable(images, prompts)
            surrogate = surrogate + r_d.mean()
            parts.append(r_d.detach())
            components.update(getattr(self.differentiable, "last_components", {}))
        metrics = {}
        if self.nondifferentiable is not None:
            with torch.no_grad():
                r_n = self.nondifferentiable(images.detach(), prompts).detach().float()
            components.update(getattr(self.nondifferentiable, "last_components", {}))
            parts.append(r_n.to(images.dtype))
            b = leave_one_out_baseline(r_n, prompts) if self.baseline == "loo" else torch.zeros_like(r_n)
            adv = r_n - b
            logp = chain_logprob(world, cond, traj, self.timesteps, self.grad_checkpointing)
            # value: the reward itself (so the logged loss is the objective); gradient: the score-function term
            surrogate = surrogate + r_n.mean() + (adv * (logp - logp.detach())).mean()
            metrics = {"reward_nondiff": r_n.mean().item(), "score_adv_std": adv.std().item() if len(adv) > 1 else 0.0}
        if hasattr(self.reward, "last_components"):
            self.reward.last_components = components  # per-component logging, as a plain call would leave it
        return sum(parts), surrogate, metrics


def hybrid_objective(cfg, reward: Any, timesteps: list[int], grad_checkpointing: bool = False) -> HybridObjective | None:
    """The hybrid objective for a reward with a non-differentiable component (None: all differentiable)."""
    _, nondiff = split_reward(reward)
    if nondiff is None:
        return None
    return HybridObjective(reward, timesteps, getattr(cfg, "score_baseline", "loo"), grad_checkpointing)
