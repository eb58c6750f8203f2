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

from ..chain import ChainNoise, run_chain
from .policy_gradient import PolicyGradient, gaussian_logprob, step_logprobs


class D3po(PolicyGradient):
    name = "d3po"

    @staticmethod
    def batch_prompts(prompts: list[str]) -> list[str]:
        """The trainer's batch as pairs: the first half of its prompts, each twice (i and i + B/2)."""
        half = len(prompts) // 2
        return prompts[:half] * 2

    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator):
        """Pairs (i, i + B/2) of chains for the same prompt and initial latent: (cond, states, policy
        log-probs, reference log-probs (B, K-1), rewards, images)."""
        half = len(prompts) // 2
        if prompts[:half] != prompts[half:]:
            raise ValueError("d3po expects paired prompts (see batch_prompts)")
        noise = ChainNoise.draw(len(prompts), self.world.latent_shape, self.cfg.num_steps, generator,
                                self.world.device, self.world.dtype)
        noise.initial[half:] = noise.initial[:half]
        cond = self.world.encode_prompts(prompts)
        traj = run_chain(self.world, cond, noise, self.timesteps, with_reference=True)
        images = self.world.decode(traj.x0).float().clamp(0, 1)
        rewards = self.reward(images, prompts).detach()
        logp = step_logprobs(traj, traj.states[1:])
        ref_logp = torch.stack([gaussian_logprob(traj.states[k + 1], traj.ref_means[k], traj.sigmas[k])
                                for k in range(len(traj.states) - 1)], 1)
        return cond, traj.states, logp, ref_logp, rewards, images

    def step(self, prompts: list[str], generator: torch.Generator, optimizer_step):
        cfg = self.cfg
        cond, states, _, ref_logp, rewards, images = self.rollout(prompts, generator)
        half = len(prompts) // 2
        first_wins = rewards[:half] >= rewards[half:]
        ar = torch.arange(half, device=rewards.device)
        win = torch.where(first_wins, ar, ar + half)
        lose = torch.where(first_wins, ar + half, ar)
        losses, norms, accs, margins = [], [], [], []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(half, generator=generator).to(rewards.device)
            for pairs in torch.tensor_split(perm, min(cfg.ppo_minibatches, half)):
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
