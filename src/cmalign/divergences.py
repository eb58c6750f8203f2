"""f-divergences between the per-step Gaussian policies N(mu_p, s^2 I) and N(mu_q, s^2 I) (DESIGN §2).

Every function takes (mu_p, mu_q, sigma) with mu of shape (B, ...) and sigma a scalar or a (B,)
tensor, and returns one value per batch element (B,). With delta = ||mu_p - mu_q|| / sigma:

    reduction="per_dim": mean over coordinates of the 1-D divergence with delta_i = |dmu_i| / sigma
                         (beta then means the same at any resolution; bounded ones do not saturate)
    reduction="joint":   the exact divergence of the two d-dimensional Gaussians
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

REDUCTIONS = ("per_dim", "joint")
JS_ESTIMATORS = ("gauss_hermite", "mc")
GAUSS_HERMITE_NODES = 48
LOG2 = math.log(2.0)


def _scaled_diff(mu_p: torch.Tensor, mu_q: torch.Tensor, sigma) -> torch.Tensor:
    """(mu_p - mu_q) / sigma flattened to (B, d)."""
    diff = (mu_p - mu_q).flatten(1)
    sigma = torch.as_tensor(sigma, dtype=diff.dtype, device=diff.device)
    if sigma.dim() > 0:
        sigma = sigma.reshape(-1, 1)
    return diff / sigma


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown divergence reduction {reduction!r}; expected one of {REDUCTIONS}")


def _reduce(per_coordinate_fn, delta: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a function of delta^2 per coordinate (mean) or to the joint delta^2."""
    _check_reduction(reduction)
    if reduction == "per_dim":
        return per_coordinate_fn(delta.square()).mean(dim=1)
    return per_coordinate_fn(delta.square().sum(dim=1))


def kl(mu_p, mu_q, sigma, reduction: str = "per_dim") -> torch.Tensor:
    """KL = delta^2 / 2 (symmetric for equal variances).

    Summed over the steps of a rollout it estimates the KL between the two path measures, by the chain rule
    KL(P || Q) = E_{x ~ P}[sum_k KL(p_k(. | x_k) || q_k(. | x_k))], under three conditions: reduction "joint"
    (per_dim divides each term by the dimension d), final_step "skip" (the floor adds a final-step term that
    is no transition of the path) and in expectation over the policy's states (one rollout is a one-sample
    estimate; the initial state is shared). tests/test_divergences.py checks the identity on a linear chain."""
    return _reduce(lambda d2: d2 / 2, _scaled_diff(mu_p, mu_q, sigma), reduction)


def hellinger(mu_p, mu_q, sigma, reduction: str = "per_dim") -> torch.Tensor:
    """Squared Hellinger distance H^2 = 1 - exp(-delta^2 / 8), in [0, 1]."""
    return _reduce(lambda d2: -torch.expm1(-d2 / 8), _scaled_diff(mu_p, mu_q, sigma), reduction)


def fisher(mu_p, mu_q, sigma, reduction: str = "per_dim") -> torch.Tensor:
    """Fisher divergence E_p ||grad log p - grad log q||^2 = ||dmu||^2 / sigma^4."""
    delta = _scaled_diff(mu_p, mu_q, sigma)
    sigma = torch.as_tensor(sigma, dtype=delta.dtype, device=delta.device)
    return _reduce(lambda d2: d2, delta, reduction) / sigma.reshape(-1).square()


def total_variation(mu_p, mu_q, sigma, reduction: str = "per_dim") -> torch.Tensor:
    """TV = erf(delta / (2 sqrt 2)), in [0, 1]."""
    # sqrt of a clamped square keeps the joint gradient finite (zero) where the means coincide.
    return _reduce(
        lambda d2: torch.erf(d2.clamp_min(1e-30).sqrt() / (2 * math.sqrt(2))), _scaled_diff(mu_p, mu_q, sigma), reduction
    )


@lru_cache(maxsize=None)
def _gauss_hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)  # weight exp(-u^2 / 2)
    return nodes, weights / math.sqrt(2 * math.pi)


def _js_of_delta(delta: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """E_u[log 2 - softplus(delta u - delta^2 / 2)] with quadrature nodes u and weights w (sum 1)."""
    z = delta.unsqueeze(-1) * u - (delta.square() / 2).unsqueeze(-1)
    return (w * (LOG2 - torch.nn.functional.softplus(z))).sum(-1)


def jensen_shannon(
    mu_p,
    mu_q,
    sigma,
    reduction: str = "per_dim",
    estimator: str = "gauss_hermite",
    num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Jensen–Shannon divergence, bounded by log 2: an exact 1-D expectation over u ~ N(0, 1).

    `gauss_hermite` evaluates it by quadrature (deterministic, within ~2e-6 of the exact value);
    `mc` by `num_samples` antithetic Monte Carlo draws (u and -u: unbiased, even in delta, and
    exactly zero with zero gradient where the means coincide; the paper's way, variance-reduced).
    """
    _check_reduction(reduction)
    delta = _scaled_diff(mu_p, mu_q, sigma)
    if reduction == "joint":
        # The d-dimensional JS equals the 1-D one along the mean difference.
        delta = delta.square().sum(dim=1, keepdim=True).clamp_min(1e-30).sqrt()
    if estimator == "gauss_hermite":
        nodes, weights = _gauss_hermite(GAUSS_HERMITE_NODES)
        u = torch.as_tensor(nodes, dtype=delta.dtype, device=delta.device)
        w = torch.as_tensor(weights, dtype=delta.dtype, device=delta.device)
        # Quadrature is exact up to ~1e-6; clip its rounding below the true minimum 0.
        return _js_of_delta(delta, u, w).clamp_min(0).mean(dim=1)
    elif estimator == "mc":
        half = torch.randn((num_samples + 1) // 2, generator=generator, dtype=delta.dtype).to(delta.device)
        u = torch.cat([half, -half])
        w = torch.full_like(u, 1.0 / len(u))
    else:
        raise ValueError(f"unknown JS estimator {estimator!r}; expected one of {JS_ESTIMATORS}")
    # JS is even in delta and both node sets are symmetric, so the signed delta is smooth at 0.
    return _js_of_delta(delta, u, w).mean(dim=1)


DIVERGENCES = {
    "kl": kl,
    "js": jensen_shannon,
    "hellinger": hellinger,
    "fisher": fisher,
    "tv": total_variation,
}


def divergence(name: str, mu_p, mu_q, sigma, reduction: str = "per_dim", **kwargs) -> torch.Tensor:
    """Dispatch by name: kl | js | hellinger | fisher | tv."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    return fn(mu_p, mu_q, sigma, reduction, **kwargs) if name == "js" else fn(mu_p, mu_q, sigma, reduction)


# ------------------------------------------------------------------------------------------------
# The subsampled regulariser (DESIGN §2, "Subsampled regulariser")
# ------------------------------------------------------------------------------------------------
class ReferencePlan:
    """Which per-step divergence terms of a batch are evaluated, and the weights that keep them unbiased.

    The regulariser of one batch is  R = (1/B) sum_b sum_{k<K'} D_bk  (K' = K under final_step floor,
    K - 1 under skip). A plan draws, independently of theta and from the run's generator,

      S: the steps that are evaluated (one set for the whole batch, so that the reference costs |S|
         batched calls), either
         - uniform: n of the K' steps uniformly without replacement, each weighted w_k = K'/n, or
         - importance: n steps drawn independently with replacement from probabilities p (fixed before the
           draw, e.g. from the divergences measured at earlier updates: StepImportance), step k weighted
           w_k = c_k / (n p_k) where c_k is how often it was drawn (Hansen-Hurwitz), and
      M: m of the B_global chains of the global batch uniformly without replacement (m = round(f B_global)),
         each weighted v = B_global/m,

    and estimates R by  R_hat = (1/B) sum_{b in M} sum_{k in S} w_k v D_bk.
    Unbiased value: E[w_k 1{k in S}] = 1 (uniform: P(k in S) = n/K'; importance: E[c_k] = n p_k) and
    E[v 1{b in M}] = 1, S and M are independent, so E[R_hat] = R by linearity. Unbiased gradient: S and M
    do not depend on theta (p depends only on earlier updates), so grad E_{S,M}[R_hat] = E_{S,M}[grad R_hat]
    (a finite average over the possible draws) and the expectation of grad R_hat is grad R. Under
    divergence_grad "full" the gradient of a drawn D_bk still flows through the live x_k into the earlier
    steps; under "stopgrad_ref" it is the same (biased) surrogate as with every term, and its expectation is
    that surrogate's gradient. With several ranks M is drawn on the global batch (the generator is identical
    on every rank) and each rank keeps its rows; the mean over ranks of the local (1/B) sums is then the
    single-process estimator. Why the chain weight is B_global/m and not 1/f: m is rounded, and only the
    realised inclusion probability m/B_global makes the batch mean exactly unbiased.
    """

    def __init__(self, num_terms: int, batch: int, steps: tuple[int, ...], rows: torch.Tensor | None,
                 weight: float | dict[int, float], chain_weight: float = 1.0):
        """weight: the total weight (step x chain) of every drawn step, or a dict step -> its total weight."""
        self.num_terms, self.batch, self.steps, self.rows = num_terms, batch, tuple(steps), rows
        self.weights = dict(weight) if isinstance(weight, dict) else {k: float(weight) for k in self.steps}
        self.chain_weight = float(chain_weight)

    def weight_of(self, k: int) -> float:
        """The total weight (step x chain) of drawn step k's terms."""
        return self.weights[k]

    def step_weight_of(self, k: int) -> float:
        """The step part of weight_of(k): dividing a weighted batch mean by it gives the plain mean of D_k."""
        return self.weights[k] / self.chain_weight

    def reference_rows(self, num_steps: int) -> list[torch.Tensor | None]:
        """For chain.run_chain: per chain step, the rows that need a reference call (None: all, empty: none)."""
        none = torch.zeros(0, dtype=torch.long)
        return [(self.rows if self.rows is not None else None) if k in self.steps else none for k in range(num_steps)]

    @property
    def full(self) -> bool:
        return len(self.steps) == self.num_terms and self.rows is None


def draw_reference_plan(num_terms: int, batch: int, steps="all", fraction: float = 1.0,
                        generator: torch.Generator | None = None, shard=None,
                        step_probs: torch.Tensor | None = None) -> ReferencePlan:
    """A ReferencePlan for `batch` local chains (of batch * shard.count global ones) and K' = num_terms terms.
    steps: "all" / None or n in [1, K'];  fraction in (0, 1]; step_probs (K',): draw the n steps by importance
    (with replacement) instead of uniformly. The full plan ("all", 1.0) draws no random numbers, so runs
    without subsampling keep their random stream."""
    count, index = (shard.count, shard.index) if shard is not None else (1, 0)
    if steps in ("all", None) or num_terms == 0:
        n = num_terms
    else:
        n = int(steps)
        if not 1 <= n <= num_terms:
            raise ValueError(f"divergence_steps must be in [1, {num_terms}] (the regularised steps), got {n}")
    if not 0 < fraction <= 1:
        raise ValueError(f"divergence_fraction must be in (0, 1], got {fraction}")
    if n == num_terms:  # every step: nothing to draw (importance or not)
        step_w = {k: 1.0 for k in range(num_terms)}
    elif step_probs is not None:
        step_w = _importance_steps(step_probs, n, generator)
    else:
        chosen = sorted(torch.randperm(num_terms, generator=generator)[:n].tolist())
        step_w = {k: num_terms / n for k in chosen}
    rows, chain_weight = None, 1.0
    if fraction < 1:
        total = batch * count
        m = min(total, max(1, round(fraction * total)))
        picked = torch.randperm(total, generator=generator)[:m]
        local = picked[(picked >= index * batch) & (picked < (index + 1) * batch)] - index * batch
        rows, chain_weight = local.sort().values, total / m
    return ReferencePlan(num_terms, batch, tuple(sorted(step_w)), rows,
                         {k: w * chain_weight for k, w in step_w.items()}, chain_weight)


def _importance_steps(probs: torch.Tensor, n: int, generator) -> dict[int, float]:
    """n draws with replacement from probs: drawn step -> (times drawn) / (n p_k), Hansen-Hurwitz's weight."""
    probs = probs.double() / probs.double().sum()
    drawn = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
    return {k: drawn.count(k) / (n * float(probs[k])) for k in sorted(set(drawn))}


class StepImportance:
    """Importance-sampling probabilities for the drawn steps of the subsampled regulariser (divergence_sampling
    importance): p_k = (1 - FLOOR) Dbar_k / sum_j Dbar_j + FLOOR / K', where Dbar_k is an exponential moving
    average of step k's batch-mean divergence, updated each time step k is drawn. Steps contribute very
    unequally (on the digits world the middle steps carry most of the KL), so uniform draws weighted K'/n make
    the estimate jump by a factor of tens between updates; drawing in proportion to the size of the term makes
    it nearly constant. The floor keeps every step drawn now and then (its weight is at most K'/FLOOR) so that
    its average follows the training. Until every step has been measured once the draws are uniform.
    The probabilities depend only on earlier updates, so each plan is still unbiased (ReferencePlan)."""

    FLOOR = 0.25
    DECAY = 0.8

    def __init__(self, num_terms: int):
        self.average = torch.full((num_terms,), float("nan"), dtype=torch.float64)

    def probs(self) -> torch.Tensor:
        k = len(self.average)
        if torch.isnan(self.average).any() or float(self.average.sum()) <= 0:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        return (1 - self.FLOOR) * self.average / self.average.sum() + self.FLOOR / k

    def observe(self, step_means: dict[int, float]) -> None:
        """Record the plain batch mean of D_k measured at the drawn steps (the same value on every rank)."""
        for k, value in step_means.items():
            old = float(self.average[k])
            self.average[k] = value if math.isnan(old) else self.DECAY * old + (1 - self.DECAY) * value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step_importance_average": self.average.clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.average = tensors["step_importance_average"].to(torch.float64).clone()


def plan_from_config(cfg, num_steps: int, batch: int, generator: torch.Generator | None = None, shard=None,
                     steps="all", importance: StepImportance | None = None) -> ReferencePlan:
    """The plan of a TrainConfig for a K = num_steps chain: `steps` is the method's resolved divergence_steps
    (Method.divergence_steps), importance its step probabilities (None: uniform draws); divergence_fraction and
    final_step come from cfg."""
    terms = num_steps if cfg.final_step == "floor" else num_steps - 1
    subsampled = steps != "all" or cfg.divergence_fraction < 1
    if subsampled and generator is None:
        raise ValueError("a subsampled divergence needs the run's generator (Batch.generator)")
    probs = importance.probs() if importance is not None else None
    return draw_reference_plan(terms, batch, steps, cfg.divergence_fraction, generator, shard, step_probs=probs)
