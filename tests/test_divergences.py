"""cmalign.divergences against independent references (DESIGN §2).

Per-coordinate ("per_dim") values are checked against torch.distributions (KL), numerical
integration of the actual 1-D densities (squared Hellinger, TV, JS) and Monte Carlo (Fisher);
joint values against the 1-D reduction along the mean difference and a large Monte Carlo
estimate in d = 3 built from torch.distributions log-densities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from cmalign import divergences as D

LOG2 = math.log(2.0)
NAMES = ["kl", "js", "hellinger", "fisher", "tv"]
F64 = torch.float64

# Per-coordinate standardised mean differences, signed, including very large ones (B=2, 8 coords).
DELTAS = torch.tensor(
    [
        [0.0, 0.05, -0.5, 1.3, -3.0, 4.5, 7.0, -15.0],
        [0.2, -1.0, 2.0, -2.5, 6.0, 10.0, -25.0, 40.0],
    ],
    dtype=F64,
)
SIGMAS = torch.tensor([0.7, 1.9], dtype=F64)


def _pair(sigma: torch.Tensor, seed: int = 0):
    """mu_p, mu_q of shape (2, 2, 2, 2) with (mu_p - mu_q) / sigma_b = DELTAS."""
    g = torch.Generator().manual_seed(seed)
    mu_q = torch.randn(2, 8, generator=g, dtype=F64)
    mu_p = mu_q + DELTAS * sigma.reshape(-1, 1)
    return mu_p.reshape(2, 2, 2, 2), mu_q.reshape(2, 2, 2, 2)


# ----------------------------------------------------------------------------------------------
# Independent 1-D references: integrals of the actual densities on a fine grid.
# ----------------------------------------------------------------------------------------------
def _grid_terms(mp: float, mq: float, s: float):
    lo, hi = min(mp, mq) - 16 * s, max(mp, mq) + 16 * s
    x = np.linspace(lo, hi, 200_001)
    lp = stats.norm.logpdf(x, loc=mp, scale=s)
    lq = stats.norm.logpdf(x, loc=mq, scale=s)
    return x, lp, lq


def ref_1d(name: str, mp: float, mq: float, s: float) -> float:
    if name == "kl":
        p = torch.distributions.Normal(torch.tensor(mp, dtype=F64), torch.tensor(s, dtype=F64))
        q = torch.distributions.Normal(torch.tensor(mq, dtype=F64), torch.tensor(s, dtype=F64))
        return float(torch.distributions.kl_divergence(p, q))
    if name == "fisher":
        return ref_fisher_mc(torch.tensor([mp], dtype=F64), torch.tensor([mq], dtype=F64), s, joint=False)
    x, lp, lq = _grid_terms(mp, mq, s)
    if name == "hellinger":  # H^2 = 1 - int sqrt(p q)
        return 1.0 - integrate.trapezoid(np.exp(0.5 * (lp + lq)), x)
    if name == "tv":  # TV = 1/2 int |p - q|
        return 0.5 * integrate.trapezoid(np.abs(np.exp(lp) - np.exp(lq)), x)
    if name == "js":  # JS = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2
        lm = np.logaddexp(lp, lq) - LOG2
        return integrate.trapezoid(0.5 * np.exp(lp) * (lp - lm) + 0.5 * np.exp(lq) * (lq - lm), x)
    raise AssertionError(name)


def ref_fisher_mc(mu_p: torch.Tensor, mu_q: torch.Tensor, s: float, joint: bool, n: int = 20_000) -> float:
    """E_{x~p} ||grad log p(x) - grad log q(x)||^2 by Monte Carlo with autograd scores.

    joint: over the full d-dim vectors; else the mean over coordinates of the 1-D values."""
    g = torch.Generator().manual_seed(1)
    d = mu_p.numel()
    x = (mu_p + s * torch.randn(n, d, generator=g, dtype=F64)).requires_grad_(True)
    if joint:
        cov = (s**2) * torch.eye(d, dtype=F64)
        lp = torch.distributions.MultivariateNormal(mu_p, cov).log_prob(x).sum()
        lq = torch.distributions.MultivariateNormal(mu_q, cov).log_prob(x).sum()
    else:
        lp = torch.distributions.Normal(mu_p, s).log_prob(x).sum()
        lq = torch.distributions.Normal(mu_q, s).log_prob(x).sum()
    sp, = torch.autograd.grad(lp, x)
    sq, = torch.autograd.grad(lq, x)
    sq_norm = (sp - sq).square().sum(1)
    return float(sq_norm.mean() if joint else sq_norm.mean() / d)


TOL = {"kl": 1e-10, "fisher": 1e-9, "hellinger": 1e-8, "tv": 1e-6, "js": 5e-6}  # js: 48-node Gauss-Hermite


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_per_dim_matches_mean_of_1d_references(name, sigma_kind):
    sigma_t = SIGMAS if sigma_kind == "tensor" else torch.full((2,), 0.7, dtype=F64)
    sigma = SIGMAS if sigma_kind == "tensor" else 0.7
    mu_p, mu_q = _pair(sigma_t)
    got = D.divergence(name, mu_p, mu_q, sigma, "per_dim")
    assert got.shape == (2,) and got.dtype == F64
    fp, fq = mu_p.flatten(1), mu_q.flatten(1)
    for b in range(2):
        s = float(sigma_t[b])
        refs = [ref_1d(name, float(fp[b, i]), float(fq[b, i]), s) for i in range(fp.shape[1])]
        # each 1-D value through the function itself too (one coordinate = one "per_dim" mean)
        singles = [
            float(D.divergence(name, fp[b, i].reshape(1, 1), fq[b, i].reshape(1, 1), s, "per_dim"))
            for i in range(fp.shape[1])
        ]
        np.testing.assert_allclose(singles, refs, rtol=1e-6, atol=TOL[name])
        np.testing.assert_allclose(float(got[b]), np.mean(refs), rtol=1e-6, atol=TOL[name])


def test_per_dim_closed_forms_at_large_delta():
    """Bounded divergences saturate at their bounds, unbounded ones grow like delta^2."""
    d = torch.tensor([[40.0]], dtype=F64)
    z = torch.zeros(1, 1, dtype=F64)
    assert float(D.kl(d, z, 1.0)) == pytest.approx(800.0)
    assert float(D.fisher(d, z, 2.0)) == pytest.approx(1600.0 / 16)
    assert float(D.hellinger(d, z, 1.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(D.total_variation(d, z, 1.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(D.jensen_shannon(d, z, 1.0)) == pytest.approx(LOG2, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_joint_equals_1d_reduction_along_mean_difference(name):
    g = torch.Generator().manual_seed(3)
    mu_q = torch.randn(4, 1, 2, 3, generator=g, dtype=F64)
    direction = torch.randn(4, 6, generator=g, dtype=F64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    sigma = torch.tensor([0.5, 1.0, 1.5, 0.3], dtype=F64)
    norms = torch.tensor([0.0, 0.8, 3.5, 12.0], dtype=F64)  # ||dmu|| / sigma
    mu_p = mu_q + (direction * (norms * sigma).reshape(-1, 1)).reshape(mu_q.shape)
    got = D.divergence(name, mu_p, mu_q, sigma, "joint")
    assert got.shape == (4,)
    for b in range(4):
        s = float(sigma[b])
        ref = ref_1d(name, float(norms[b]) * s, 0.0, s)
        np.testing.assert_allclose(float(got[b]), ref, rtol=1e-6, atol=TOL[name])


@pytest.mark.parametrize("delta", [0.3, 1.5, 4.0])
def test_joint_against_monte_carlo_in_d3(delta):
    """Large-sample Monte Carlo of each joint divergence from the d=3 log-densities (5 s.e.)."""
    torch.manual_seed(11)
    s = 0.8
    mu_q = torch.tensor([0.3, -1.0, 0.5], dtype=F64)
    u = torch.tensor([1.0, 2.0, -2.0], dtype=F64) / 3.0
    mu_p = mu_q + delta * s * u
    cov = s**2 * torch.eye(3, dtype=F64)
    p = torch.distributions.MultivariateNormal(mu_p, cov)
    q = torch.distributions.MultivariateNormal(mu_q, cov)
    n = 200_000
    x, y = p.sample((n,)), q.sample((n,))
    lr_x = q.log_prob(x) - p.log_prob(x)  # log q/p under p
    lr_y = p.log_prob(y) - q.log_prob(y)  # log p/q under q
    samples = {
        "kl": -lr_x,
        "hellinger": 1 - torch.exp(lr_x / 2),
        "tv": (1 - torch.exp(lr_x)).clamp_min(0),
        # JS = 1/2 E_p[log 2p/(p+q)] + 1/2 E_q[log 2q/(p+q)]; both halves sampled independently
        "js": 0.5 * (LOG2 - torch.nn.functional.softplus(lr_x)) + 0.5 * (LOG2 - torch.nn.functional.softplus(lr_y)),
    }
    P, Q = mu_p.reshape(1, 3, 1, 1), mu_q.reshape(1, 3, 1, 1)
    for name, smp in samples.items():
        est, se = float(smp.mean()), float(smp.std() / math.sqrt(n))
        got = float(D.divergence(name, P, Q, s, "joint")[0])
        assert abs(got - est) < 5 * se, (name, got, est, se)
    fisher_ref = ref_fisher_mc(mu_p, mu_q, s, joint=True)
    assert float(D.fisher(P, Q, s, "joint")[0]) == pytest.approx(fisher_ref, rel=1e-9)
    # Bounds of the bounded ones, joint
    assert float(D.jensen_shannon(P, Q, s, "joint")[0]) <= LOG2
    assert float(D.hellinger(P, Q, s, "joint")[0]) <= 1.0
    assert float(D.total_variation(P, Q, s, "joint")[0]) <= 1.0


def test_fisher_per_dim_against_monte_carlo():
    mu_p, mu_q = _pair(SIGMAS)
    got = D.fisher(mu_p, mu_q, SIGMAS, "per_dim")
    for b in range(2):
        ref = ref_fisher_mc(mu_p[b].flatten(), mu_q[b].flatten(), float(SIGMAS[b]), joint=False)
        assert float(got[b]) == pytest.approx(ref, rel=1e-9)


def test_kl_joint_against_torch_multivariate_normal():
    mu_p, mu_q = _pair(SIGMAS)
    got = D.kl(mu_p, mu_q, SIGMAS, "joint")
    for b in range(2):
        cov = float(SIGMAS[b]) ** 2 * torch.eye(8, dtype=F64)
        ref = torch.distributions.kl_divergence(
            torch.distributions.MultivariateNormal(mu_p[b].flatten(), cov),
            torch.distributions.MultivariateNormal(mu_q[b].flatten(), cov),
        )
        assert float(got[b]) == pytest.approx(float(ref), rel=1e-10)


@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
def test_js_monte_carlo_close_to_gauss_hermite(reduction):
    mu_p, mu_q = _pair(SIGMAS)
    gh = D.jensen_shannon(mu_p, mu_q, SIGMAS, reduction, estimator="gauss_hermite")
    mc = D.jensen_shannon(mu_p, mu_q, SIGMAS, reduction, estimator="mc", num_samples=400_000,
                          generator=torch.Generator().manual_seed(5))
    assert mc.shape == gh.shape == (2,)
    torch.testing.assert_close(mc, gh, atol=2.5e-3, rtol=0)
    # the estimator is random: two generators give two different estimates (unsaturated deltas)
    mu_p = mu_q + 1.0 * SIGMAS.reshape(-1, 1, 1, 1)
    mc2 = D.jensen_shannon(mu_p, mu_q, SIGMAS, reduction, estimator="mc", num_samples=64,
                           generator=torch.Generator().manual_seed(6))
    mc3 = D.jensen_shannon(mu_p, mu_q, SIGMAS, reduction, estimator="mc", num_samples=64,
                           generator=torch.Generator().manual_seed(7))
    assert not torch.equal(mc2, mc3)


def test_js_monte_carlo_estimator_is_unbiased():
    mp = torch.tensor([[0.3]], dtype=F64)
    mq = torch.zeros(1, 1, dtype=F64)
    gh = float(D.jensen_shannon(mp, mq, 1.0))
    g = torch.Generator().manual_seed(0)
    est = torch.stack([D.jensen_shannon(mp, mq, 1.0, estimator="mc", num_samples=16, generator=g) for _ in range(3000)])
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - gh) < 5 * se, (float(est.mean()), gh, se)


@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
def test_bounds_hold_everywhere(reduction):
    g = torch.Generator().manual_seed(9)
    mu_p = 30 * torch.randn(64, 1, 4, 4, generator=g, dtype=F64)
    mu_q = torch.zeros_like(mu_p)
    sigma = torch.rand(64, generator=g, dtype=F64) * 3 + 0.01
    js = D.jensen_shannon(mu_p, mu_q, sigma, reduction)
    h2 = D.hellinger(mu_p, mu_q, sigma, reduction)
    tv = D.total_variation(mu_p, mu_q, sigma, reduction)
    js_mc = D.jensen_shannon(mu_p, mu_q, sigma, reduction, estimator="mc", num_samples=32, generator=g)
    for v in (js, js_mc):
        assert (v >= 0).all() and (v <= LOG2 + 1e-12).all()
    assert (h2 >= 0).all() and (h2 <= 1).all()
    assert (tv >= 0).all() and (tv <= 1).all()
    for name in NAMES:
        assert (D.divergence(name, mu_p, mu_q, sigma, reduction) >= 0).all()


# ----------------------------------------------------------------------------------------------
# Shapes, reductions, sigma forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_sigma_forms(name):
    g = torch.Generator().manual_seed(2)
    mu_p = torch.randn(5, 3, 4, 4, generator=g)
    mu_q = torch.randn(5, 3, 4, 4, generator=g)
    sigma_t = torch.full((5,), 0.6)
    for reduction in ("per_dim", "joint"):
        a = D.divergence(name, mu_p, mu_q, 0.6, reduction)
        b = D.divergence(name, mu_p, mu_q, sigma_t, reduction)
        assert a.shape == b.shape == (5,) and a.dtype == torch.float32
        torch.testing.assert_close(a, b)
        # per-sample sigma really is per sample: element b uses sigma_b
        sig = torch.tensor([0.3, 0.6, 0.9, 1.2, 1.5])
        c = D.divergence(name, mu_p, mu_q, sig, reduction)
        for i in range(5):
            one = D.divergence(name, mu_p[i : i + 1], mu_q[i : i + 1], float(sig[i]), reduction)
            torch.testing.assert_close(c[i : i + 1], one)


@pytest.mark.parametrize("name", NAMES)
def test_per_dim_is_mean_of_coordinates_and_joint_differs(name):
    g = torch.Generator().manual_seed(4)
    mu_p = torch.randn(3, 2, 2, 2, generator=g, dtype=F64)
    mu_q = torch.randn(3, 2, 2, 2, generator=g, dtype=F64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    per_dim = D.divergence(name, mu_p, mu_q, sigma, "per_dim")
    coords = torch.stack(
        [D.divergence(name, mu_p.flatten(1)[:, i : i + 1], mu_q.flatten(1)[:, i : i + 1], sigma, "per_dim")
         for i in range(8)], dim=1)
    torch.testing.assert_close(per_dim, coords.mean(1))
    joint = D.divergence(name, mu_p, mu_q, sigma, "joint")
    if name in ("kl", "fisher"):  # additive over coordinates: joint = d * per_dim
        torch.testing.assert_close(joint, 8 * per_dim)
    else:
        assert not torch.allclose(joint, per_dim)


def test_closed_forms_in_delta():
    d = torch.tensor([[0.0, 0.5, 1.0, 2.0, 5.0]], dtype=F64).T  # (5, 1): five samples, one coordinate
    z = torch.zeros_like(d)
    delta = d.squeeze(1)
    torch.testing.assert_close(D.kl(d, z, 1.0), delta**2 / 2)
    torch.testing.assert_close(D.hellinger(d, z, 1.0), 1 - torch.exp(-(delta**2) / 8))
    torch.testing.assert_close(D.total_variation(d, z, 1.0), torch.erf(delta / (2 * math.sqrt(2))))
    torch.testing.assert_close(D.fisher(2 * d, z, 2.0), (2 * delta) ** 2 / 16)


# ----------------------------------------------------------------------------------------------
# Coinciding means: zero value and a finite, zero gradient
# ----------------------------------------------------------------------------------------------
CASES = [("kl", {}), ("hellinger", {}), ("fisher", {}), ("tv", {}), ("js", {"estimator": "gauss_hermite"}),
         ("js", {"estimator": "mc", "num_samples": 16})]


@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k.get('estimator', '')}" for n, k in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_zero_gradient_at_coinciding_means(name, kwargs, reduction, dtype, request):
    mu = torch.randn(3, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    mu_p = mu.clone().requires_grad_(True)
    mu_q = mu.clone().requires_grad_(True)
    sigma = torch.tensor([0.2, 1.0, 3.0], dtype=dtype)
    if "num_samples" in kwargs:
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(1))
    v = D.divergence(name, mu_p, mu_q, sigma, reduction, **kwargs)
    assert v.shape == (3,)
    assert torch.all(v.abs() <= 1e-12), v
    gp, gq = torch.autograd.grad(v.sum(), (mu_p, mu_q))
    for g in (gp, gq):
        assert torch.isfinite(g).all()
        assert g.abs().max() <= 1e-6, g.abs().max()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
def test_gradient_points_away_from_reference_when_means_differ(name, reduction):
    """Away from coincidence the gradient w.r.t. mu_p is finite and increases the divergence
    along dmu (a first-order check that every divergence is differentiable and monotone)."""
    g = torch.Generator().manual_seed(8)
    mu_q = torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    dmu = 0.3 * torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    mu_p = (mu_q + dmu).requires_grad_(True)
    v = D.divergence(name, mu_p, mu_q, 0.5, reduction)
    grad, = torch.autograd.grad(v.sum(), mu_p)
    assert torch.isfinite(grad).all()
    assert ((grad * dmu).flatten(1).sum(1) > 0).all()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_unknown_names_raise_value_error():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        D.divergence("chi2", a, b, 1.0)
    for name in NAMES:
        with pytest.raises(ValueError, match="reduction"):
            D.divergence(name, a, b, 1.0, "sum")
    with pytest.raises(ValueError, match="estimator"):
        D.divergence("js", a, b, 1.0, "per_dim", estimator="quadrature")
    with pytest.raises(ValueError, match="estimator"):
        D.jensen_shannon(a, b, 1.0, "joint", estimator="importance")


def test_summed_joint_kl_over_policy_rollouts_is_the_path_kl():
    """Chain rule of KL on a linear Gaussian chain in d = 2: x_1 ~ N(0, I) for both, x_{k+1} | x_k ~ N(A_k x_k, s_k^2 I)
    under P and N(B_k x_k, s_k^2 I) under Q. The exact KL of the joint Gaussians over (x_1, x_2, x_3) equals the
    expectation over P-rollouts of sum_k D.kl(A_k x_k, B_k x_k, s_k, "joint"); per_dim gives it divided by d."""
    torch.manual_seed(0)
    d, sig = 2, [0.7, 0.4]
    A = [torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=torch.float64), torch.tensor([[0.5, 0.0], [0.3, 1.1]], dtype=torch.float64)]
    B = [torch.tensor([[0.7, 0.1], [0.0, 0.9]], dtype=torch.float64), torch.tensor([[0.6, -0.2], [0.2, 1.0]], dtype=torch.float64)]

    def joint(mats):  # the covariance of (x_1, x_2, x_3): x = L z with z ~ N(0, I_6)
        eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        m1, m2 = mats
        L = torch.cat([torch.cat([eye, zero, zero], 1),
                       torch.cat([m1, sig[0] * eye, zero], 1),
                       torch.cat([m2 @ m1, sig[0] * m2, sig[1] * eye], 1)])
        return torch.distributions.MultivariateNormal(torch.zeros(3 * d, dtype=torch.float64), scale_tril=torch.linalg.cholesky(L @ L.T))

    exact = float(torch.distributions.kl_divergence(joint(A), joint(B)))
    n = 200_000
    x = [torch.randn(n, d, dtype=torch.float64)]
    total = torch.zeros(n, dtype=torch.float64)
    per_dim = torch.zeros(n, dtype=torch.float64)
    for k in range(2):
        mu_p, mu_q = x[-1] @ A[k].T, x[-1] @ B[k].T
        total += D.kl(mu_p, mu_q, sig[k], "joint")
        per_dim += D.kl(mu_p, mu_q, sig[k], "per_dim")
        x.append(mu_p + sig[k] * torch.randn(n, d, dtype=torch.float64))
    sem = float(total.std()) / math.sqrt(n)
    assert abs(float(total.mean()) - exact) < 4 * sem, (float(total.mean()), exact, sem)
    assert torch.allclose(per_dim, total / d)
