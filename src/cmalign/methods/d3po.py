"""D3PO (Yang et al. 2024): direct preference optimisation applied to every denoising step, on the
same rollout core as the policy-gradient baselines.

Each update draws B/2 prompts and two chains per prompt that share the initial latent x_1 and differ
in their step noises; the training reward ranks each pair (winner w, loser l; the reward model
stands in for the human labeller). Every stochastic step k < K is a DPO problem of its own:

    L = - mean_k log sigmoid( beta * [ (log pi(x_{k+1}^w | x_k^w) - log pi_ref(x_{k+1}^w | x_k^w))
                                     - (log pi(x_{k+1}^l | x_k^l) - log pi_ref(x_{k+1}^l | x_k^l)) ] )

with the frozen base model (adapter disabled) as pi_ref, the Gaussians and per-dimension mean
log-probabilities of policy_gradient.step_logprobs, and beta (TrainConfig.beta) as DPO's temperature.
D3PO's published code uses the sampling policy as the reference with a clipped ratio; the frozen
reference is the formulation of its paper and keeps the method anchored like ROCM's divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmalign.chain import run_chain
from cmalign.errors import UserError
from cmalign.methods.base import Batch
from cmalign.methods.policy_gradient import PolicyGradient, gaussian_logprob, step_logprobs


class D3po(PolicyGradient):
    name = "d3po"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cls.chain_length(cfg) < 2:
            raise UserError("d3po needs K >= 2: the last step is deterministic, so K = 1 has no step to compare")
        if cfg.batch_size < 2 or cfg.batch_size % 2:
            raise UserError(f"d3po trains on pairs: batch_size must be even and >= 2, got {cfg.batch_size}")
        if cfg.beta <= 0:
            raise UserError(f"d3po needs beta > 0 (DPO's temperature), got {cfg.beta}")

    def batch_prompts(self, prompts: list[str]) -> list[str]:
        """The trainer's batch as pairs: the first half of its prompts, each twice (i and i + B/2)."""
        half = len(prompts) // 2
        return prompts[:half] * 2

    @torch.no_grad()
    def rollout(self, batch: Batch):
        """Pairs (i, i + B/2) of chains for the same prompt and initial latent: (cond, states, policy
        log-probs, reference log-probs (B, K-1), rewards, images)."""
        prompts = batch.prompts
        half = len(prompts) // 2
        if prompts[:half] != prompts[half:]:
            raise ValueError("d3po expects paired prompts (see batch_prompts)")
        noise = batch.noise(self.world, self.num_steps)
        noise.initial[half:] = noise.initial[:half]
        cond = self.world.encode_prompts(prompts)
        traj = run_chain(self.world, cond, noise, self.timesteps, with_reference=True)
        images = self.world.decode(traj.x0).float().clamp(0, 1)
        rewards = self.reward(images, prompts).detach()
        logp = step_logprobs(traj, traj.states[1:])
        ref_logp = torch.stack([gaussian_logprob(traj.states[k + 1], traj.ref_means[k], traj.sigmas[k])
                                for k in range(len(traj.states) - 1)], 1)
        return cond, traj.states, logp, ref_logp, rewards, images

    def step(self, batch: Batch, optimizer_step):
        cfg = self.cfg
        prompts = batch.prompts
        cond, states, _, ref_logp, rewards, images = self.rollout(batch)
        half = len(prompts) // 2
        first_wins = rewards[:half] >= rewards[half:]
        ar = torch.arange(half, device=rewards.device)
        win = torch.where(first_wins, ar, ar + half)
        lose = torch.where(first_wins, ar + half, ar)
        losses, norms, accs, margins = [], [], [], []
        for _ in range(cfg.ppo.epochs):
            perm = torch.randperm(half, generator=batch.generator).to(rewards.device)
            for pairs in torch.tensor_split(perm, min(cfg.ppo.minibatches, half)):
                idx = torch.cat([win[pairs], lose[pairs]])
                new_logp, _ = self.evaluate_policy(cond, states, idx)
                ratio = new_logp - ref_logp[idx]  # (2b, K-1) log pi / pi_ref of each step's action
                n = len(pairs)
                margin = cfg.beta * (ratio[:n] - ratio[n:])
                loss = -F.logsigmoid(margin).mean()
                norms.append(optimizer_step(loss))
                losses.append(loss.item())
                accs.append((margin > 0).float().mean().item())
                margins.append(margin.mean().item())
        metrics = {
            "reward": rewards.mean().item(),
            "loss": sum(losses) / len(losses),
            "divergence": None,
            "pair_reward_gap": (rewards[win] - rewards[lose]).mean().item(),
            "implicit_accuracy": sum(accs) / len(accs),
            "margin": sum(margins) / len(margins),
            "grad_norm": sum(norms) / len(norms),
            "updates": len(norms),
        }
        return metrics, images
