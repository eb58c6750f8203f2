"""Policy-gradient baselines on the same rollout core (DESIGN §2, "Policy-gradient baselines"):

- rlcm: PPO on the consistency-model MDP (Oertell et al.), the chain of chain.run_chain;
- ddpo: the same PPO on a diffusion model's DDIM(eta = 1) chain (Black et al.); the world carries a
  chain.DDIMTransition, so the loop and the Gaussians are the same code;
- dpok: the same policy gradient plus beta * the per-step divergence to the reference (Fan et al.).

Actions and log-probabilities. Step k < K is the Gaussian policy N(mu_k, s_k^2 I) of run_chain; the
log-probability of the stored next state is log N(x_{k+1}; mu_k, s_k^2), averaged over dimensions
(as RLCM's code does). The final step is deterministic (x0 = m_K, no noise) and is *not* an action:
it has no log-probability and the reward is computed on m_K itself. RLCM's code adds noise at the
last step but scores the noiseless output, so that extra log-probability has zero expected gradient;
leaving it out is the lower-variance estimator of the same gradient. The final-step floor therefore
only enters dpok's divergence term (final_step: floor | skip, as in ROCM); with K = 1 the chain has
no action at all and rlcm refuses it.

Rewards are normalised per prompt (a buffer of recent rewards per prompt, batch statistics until it
holds stat_min_count), clipped to +-adv_clip; the PPO objective max(-A r, -A clip(r, 1 - eps, 1 + eps))
is averaged over samples and steps; each batch of rollouts is reused for ppo_epochs epochs of
ppo_minibatches minibatches, each one optimizer_step.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque

import torch

from cmalign.chain import DDIMTransition, index_cond, run_chain, step_divergences
from cmalign.divergences import plan_from_config
from cmalign.errors import UserError
from cmalign.methods.base import Batch, Method
from cmalign.methods.policy_gradient_config import DDPOConfig, PPOConfig

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) averaged over all non-batch dimensions, shape (B,)."""
    z = (x.float() - mean.float()) / sigma
    return (-0.5 * z**2 - math.log(sigma) - LOG_SQRT_2PI).flatten(1).mean(1)


def step_logprobs(traj, next_states: list[torch.Tensor]) -> torch.Tensor:
    """(B, n) log-probabilities of next_states[k] = x_{k+1} under the trajectory's step-k Gaussian."""
    return torch.stack([gaussian_logprob(next_states[k], traj.means[k], traj.sigmas[k]) for k in range(len(next_states))], 1)


def ppo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float):
    """PPO's clipped surrogate (to minimise), the mean ratio and the fraction of clipped terms.
    new/old_logp (B, n); adv (B,)."""
    ratio = torch.exp(new_logp - old_logp)
    a = adv.view(-1, 1).to(ratio.dtype)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, ratio.detach(), clipfrac.detach()


class PerPromptStats:
    """DDPO's per-prompt stat tracker: normalise each reward by its prompt's recent rewards."""

    def __init__(self, buffer: int = 32, min_count: int = 16):
        self.buffer, self.min_count = buffer, min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=max(buffer, 1)))

    def normalize(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().float().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std() if len(r) > 1 else torch.tensor(1.0)
        for p in set(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            if self.buffer > 0:
                self.history[p].extend(r[idx].tolist())
            hist = torch.tensor(list(self.history[p])) if self.buffer > 0 else torch.zeros(0)
            if len(hist) >= self.min_count:
                mean, std = hist.mean(), hist.std()
            else:
                mean, std = batch_mean, batch_std
            out[idx] = (r[idx] - mean) / (std + 1e-6)
        return out.to(rewards.device)


class PolicyGradient(Method):
    name = "policy_gradient"
    config_sections = {"ppo": PPOConfig}
    needs_differentiable_reward = False
    needs_log_prob = True  # PPO ratios (and d3po's DPO terms) of the step log-probabilities

    @classmethod
    def check_config(cls, cfg) -> None:
        if cls.chain_length(cfg) < 2:
            raise UserError(f"{cls.name} needs K >= 2: the last step is deterministic, so K = 1 has no action to reinforce")
        if cfg.ppo.minibatches > cfg.batch_size:
            raise UserError(f"ppo.minibatches ({cfg.ppo.minibatches}) must be <= batch_size ({cfg.batch_size})")

    def __init__(self, cfg, world, reward, kl_weight: float = 0.0):
        super().__init__(cfg, world, reward)
        self.kl_weight = kl_weight
        self.num_steps = type(self).chain_length(cfg)
        if self.num_steps < 2:
            raise UserError(f"{self.name} needs K >= 2: the last step is deterministic, so K = 1 has no action to reinforce")
        self.timesteps = world.timesteps(self.num_steps)
        self.stats = PerPromptStats(cfg.ppo.stat_buffer, cfg.ppo.stat_min_count)

    def state_dict(self):
        """The per-prompt reward buffers (exact resume: the advantages of the next steps depend on them)."""
        return {}, {"stat_history": {p: list(h) for p, h in self.stats.history.items()}}

    def load_state_dict(self, tensors, meta):
        self.stats.history.clear()
        for prompt, values in meta.get("stat_history", {}).items():
            self.stats.history[prompt].extend(float(v) for v in values)

    @torch.no_grad()
    def rollout(self, batch: Batch):
        """Sample chains with the current policy: (cond, states x_1..x_K, old log-probs (B, K-1), rewards, images)."""
        prompts = batch.prompts
        noise = batch.noise(self.world, self.num_steps)
        cond = self.world.encode_prompts(prompts)
        traj = run_chain(self.world, cond, noise, self.timesteps)
        images = self.world.decode(traj.x0).float().clamp(0, 1)
        rewards = self.reward(images, prompts).detach()
        old = step_logprobs(traj, traj.states[1:])
        return cond, traj.states, old, rewards, images

    def evaluate_policy(self, cond, states: list[torch.Tensor], idx: torch.Tensor, generator: torch.Generator | None = None):
        """Re-run the policy (with gradient) on stored states of the samples idx: (log-probs (b, K-1), divergence (b,) or None).
        The divergence is subsampled as configured (divergence_steps / _fraction, over these b chains, from generator)."""
        sub = [s[idx] for s in states]
        c = index_cond(cond, idx)
        with_ref = self.kl_weight > 0
        n = len(sub) if (with_ref and self.cfg.final_step == "floor") else len(sub) - 1
        plan = plan_from_config(self.cfg, len(sub), len(idx), generator, steps=type(self).divergence_steps(self.cfg)) if with_ref else None
        traj = run_chain(self.world, c, None, self.timesteps, states=sub[:n], with_reference=with_ref,
                         divergence_grad=self.cfg.divergence_grad,
                         reference_rows=plan.reference_rows(n) if plan is not None else None)
        logp = step_logprobs(traj, sub[1:])
        div = None
        if with_ref:
            final = "floor" if n == len(sub) else "skip"  # skip: the K-1 stochastic steps are all there is
            div = step_divergences(traj, self.cfg.divergence, self.cfg.divergence_reduction, final, plan=plan).sum(1)
        return logp, div

    def step(self, batch: Batch, optimizer_step):
        ppo = self.cfg.ppo
        prompts = batch.prompts
        cond, states, old_logp, rewards, images = self.rollout(batch)
        adv = self.stats.normalize(prompts, rewards).clamp(-ppo.adv_clip, ppo.adv_clip)
        b = len(prompts)
        ratios, clipfracs, losses, norms, divs = [], [], [], [], []
        for _ in range(ppo.epochs):
            perm = torch.randperm(b, generator=batch.generator)
            for idx in torch.tensor_split(perm, ppo.minibatches):
                idx = idx.to(old_logp.device)
                new_logp, div = self.evaluate_policy(cond, states, idx, batch.generator)
                loss, ratio, clipfrac = ppo_loss(new_logp, old_logp[idx], adv[idx], ppo.clip)
                if div is not None:
                    loss = loss + self.kl_weight * div.mean()
                    divs.append(div.mean().item())
                norms.append(optimizer_step(loss))
                ratios.append(ratio.mean().item())
                clipfracs.append(clipfrac.item())
                losses.append(loss.item())
        metrics = {
            "reward": rewards.mean().item(),
            "loss": sum(losses) / len(losses),
            "divergence": sum(divs) / len(divs) if divs else None,
            "ratio_first": ratios[0],
            "ratio_mean": sum(ratios) / len(ratios),
            "clipfrac": sum(clipfracs) / len(clipfracs),
            "grad_norm": sum(norms) / len(norms),
            "updates": len(norms),
        }
        return metrics, images


class Rlcm(PolicyGradient):
    name = "rlcm"


class Ddpo(PolicyGradient):
    """PPO on a diffusion model's DDIM(eta) chain of ddpo.steps steps: the world samples its diffusion
    model (the digits world: the DDPM teacher) with a chain.DDIMTransition."""

    name = "ddpo"
    config_sections = {"ppo": PPOConfig, "ddpo": DDPOConfig}

    @classmethod
    def transition(cls, cfg):
        return DDIMTransition(eta=cfg.ddpo.eta)

    @classmethod
    def chain_length(cls, cfg) -> int:
        return cfg.ddpo.steps

    def __init__(self, cfg, world, reward):
        if not isinstance(getattr(world, "transition", None), DDIMTransition):
            raise UserError("ddpo needs a world with a DDIM transition (build it with method ddpo)")
        super().__init__(cfg, world, reward)


class Dpok(PolicyGradient):
    name = "dpok"
    per_step_divergence = True

    def __init__(self, cfg, world, reward):
        super().__init__(cfg, world, reward, kl_weight=cfg.beta)
