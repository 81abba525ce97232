"""Score function with control variates, leave-one-out, and the measure-valued derivative on the closed-form table
of ``reference/estimators.md``: x ~ N(mu, sigma^2), f(x) = (x - k)^2, mu = sigma = k = 1, exact gradient (0, 2).

Every estimate comes through the library's own per-site machinery: an ELBO of :func:`pyro_vae.infer.elbo.make_elbo`
on a tiny model/guide pair whose ELBO gradient with respect to the guide's (mu, sigma) is minus the gradient of
E_q f. The guide samples ``x ~ N(mu, sigma)`` in a plate of ``n`` entries, each with its own (mu, sigma) (so each
entry's gradient is one independent one-draw estimate); the model scores the same value under ``N(mu, sigma)``
with *detached* parameters, and adds ``pyro.factor("f", -f(x))``. The cost the estimators see is then
``log p(x) - f(x) - log q(x) = -f(x)`` exactly (``p`` and ``q`` are the same density at the drawn value), and
``p``'s detached parameters carry no gradient: the loss gradient is exactly the estimate of grad E_q f.

Derivations, with eps = (x - mu) / sigma ~ N(0, 1), f = eps^2, scores s_mu = eps, s_sigma = eps^2 - 1 and the
Gaussian moments E eps^{2m} = 1, 3, 15, 105, 945, 10395 (m = 1..6):

- score function: f s_mu = eps^3, variance E eps^6 = 15; f s_sigma = eps^4 - eps^2, variance 78 - 2^2 = 74.
- baseline E f = 1: (eps^2 - 1) eps, variance 15 - 6 + 1 = 10; (eps^2 - 1)^2, variance 60 - 4 = 56. The library
  estimates E f by the mean of M independent draws; a baseline b independent of the draw adds Var(b) E[s^2]:
  Var(f) / M = 2 / M times E s^2 = 1 (mu) or 2 (sigma).
- optimal constant baseline per parameter, c* = E[f s^2] / E[s^2]: c_mu = 3, variance of (eps^2 - 3) eps is
  15 - 18 + 9 = 6; c_sigma = 10 / 2 = 5, variance of (eps^2 - 5)(eps^2 - 1) is 28 - 4 = 24. The library estimates
  c from M independent draws as mean(f s^2) / I with the exact Fisher information I (1 and 2): Var(c_hat) I =
  Var(f s^2) / (M I), Var(eps^4) = 96 (mu) and Var(eps^2 (eps^2 - 1)^2) = 7188 - 100 = 7088 over I = 2 (sigma),
  so the variances are 6 + 96 / M and 24 + 3544 / M (the table's 6 / 24 is the limit M -> infinity).
- delta method: f is its own second-order expansion, so the estimate is the exact gradient, variance 0 / 0.
- measure-valued, coupled: d/dmu = (f(mu + sigma W) - f(mu - sigma W)) / (sqrt(2 pi) sigma) = 0 at mu = k;
  d/dsigma = M^2 (1 - U^2) with M double-sided Maxwell: E = 3 * 2/3 = 2, E[.^2] = 15 * 8/15 = 8, variance 4.
- leave-one-out with K = 2: (1/2)(f1 - f2)(s1 - s2); with a = (eps1 - eps2)/sqrt 2, b = (eps1 + eps2)/sqrt 2
  independent N(0, 1) it is sqrt(2) a^2 b (variance 2 * 3 = 6) and 2 a^2 b^2 (mean 2, variance 36 - 4 = 32),
  below the plain score function averaged over K = 2 draws (15 / 2, 74 / 2).

Seeded statistical tests: each mean and variance is compared with its closed form at 4 standard errors of the
estimate (the standard error of a variance from the sample's fourth central moment), a false-failure rate of about
6e-5 per comparison under the normal approximation (about 1e-3 over this file's comparisons).
"""

from __future__ import annotations

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.errors import ConfigError
from pyro_vae.infer.control_variates import leave_one_out_baseline, normal_fisher_information, normal_scores
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import ESTIMATORS

N = 200_000


def one_draw_gradients(estimator, n: int = N, num_particles: int = 1, f=lambda x: (x - 1.0) ** 2,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` independent one-estimate gradients of E_q f at mu = sigma = 1, through make_elbo's ELBO."""
    pyro.set_rng_seed(seed)
    mu = torch.ones(n, requires_grad=True)
    sigma = torch.ones(n, requires_grad=True)

    def model():
        with pyro.plate("draws", n):
            x = pyro.sample("x", dist.Normal(mu.detach(), sigma.detach()))
            pyro.factor("f", -f(x))

    def guide():
        with pyro.plate("draws", n):
            pyro.sample("x", dist.Normal(mu, sigma))

    loss = make_elbo("trace", num_particles, estimator, max_plate_nesting=1).differentiable_loss(model, guide)
    g_mu, g_sigma = torch.autograd.grad(loss, [mu, sigma])
    return g_mu.double(), g_sigma.double()


def variance_and_se(g: torch.Tensor) -> tuple[float, float]:
    c = g - g.mean()
    var = float(c.pow(2).mean())
    return var, math.sqrt(max(float(c.pow(4).mean()) - var**2, 0.0) / g.numel())


def assert_mean_and_variance(g: torch.Tensor, mean: float, variance: float) -> None:
    var, se = variance_and_se(g)
    assert abs(var - variance) < 4 * se, (var, variance, se)
    assert abs(float(g.mean()) - mean) < 4 * math.sqrt(var / g.numel()) + 1e-9, (float(g.mean()), mean)


M = ESTIMATORS["score-function-optimal-cv"].cv_samples


@pytest.mark.parametrize("estimator, expected", [
    ("score-function", (15.0, 74.0)),
    ("score-function-mean-baseline", (10.0 + 2.0 / M, 56.0 + 4.0 / M)),
    ("score-function-optimal-cv", (6.0 + 96.0 / M, 24.0 + 3544.0 / M)),
    ("measure-valued", (0.0, 4.0)),
])
def test_closed_form_table(estimator, expected):
    assert ESTIMATORS["score-function-mean-baseline"].cv_samples == M
    g_mu, g_sigma = one_draw_gradients(estimator)
    if expected[0] == 0.0:  # measure-valued d/dmu: f(1 + W) - f(1 - W) = 0 for every draw
        assert float(g_mu.abs().max()) < 1e-5
    else:
        assert_mean_and_variance(g_mu, 0.0, expected[0])
    assert_mean_and_variance(g_sigma, 2.0, expected[1])


def test_optimal_coefficient_approaches_the_table_with_many_draws():
    """With M = 512 draws for the coefficient the variances are 6 + 96/512 and 24 + 3544/512 (table: 6 / 24)."""
    est = dataclasses.replace(ESTIMATORS["score-function-optimal-cv"], cv_samples=512)
    g_mu, g_sigma = one_draw_gradients(est, n=20_000)
    assert_mean_and_variance(g_mu, 0.0, 6.0 + 96.0 / 512)
    assert_mean_and_variance(g_sigma, 2.0, 24.0 + 3544.0 / 512)


def test_delta_method_is_exact_on_a_quadratic():
    g_mu, g_sigma = one_draw_gradients("score-function-delta-cv", n=10_000)
    assert torch.allclose(g_mu, torch.zeros_like(g_mu), atol=1e-5)
    assert torch.allclose(g_sigma, torch.full_like(g_sigma, 2.0), atol=1e-5)


@pytest.mark.parametrize("estimator, num_particles", [
    ("score-function-mean-baseline", 1), ("score-function-optimal-cv", 1), ("score-function-delta-cv", 1),
    ("measure-valued", 1), ("rloo", 2), ("rloo", 5)])
def test_unbiased_on_a_cubic(estimator, num_particles):
    """f(x) = x^3 + x^2 (not its own Taylor expansion): grad E f = (3 mu^2 + 3 sigma^2 + 2 mu, 6 mu sigma +
    2 sigma) = (8, 8), within 4 standard errors."""
    g_mu, g_sigma = one_draw_gradients(estimator, n=50_000, num_particles=num_particles, f=lambda x: x**3 + x**2)
    for g in (g_mu, g_sigma):
        assert abs(float(g.mean()) - 8.0) < 4 * float(g.std()) / math.sqrt(g.numel()), float(g.mean())


def test_rloo_unbiased_and_below_the_score_function_at_two_draws():
    g_mu, g_sigma = one_draw_gradients("rloo", num_particles=2)
    assert_mean_and_variance(g_mu, 0.0, 6.0)
    assert_mean_and_variance(g_sigma, 2.0, 32.0)
    s_mu, s_sigma = one_draw_gradients("score-function", num_particles=2, seed=1)
    assert_mean_and_variance(s_mu, 0.0, 7.5)
    assert_mean_and_variance(s_sigma, 2.0, 37.0)


def test_rloo_needs_two_particles():
    with pytest.raises(ConfigError, match=r'num_particles with estimator "rloo".*K >= 2'):
        make_elbo("trace", 1, "rloo")


def test_helpers_closed_forms():
    z, loc, scale = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([2.0])
    s_loc, s_scale = normal_scores(z, loc, scale)
    assert torch.allclose(s_loc, torch.tensor([0.25])) and torch.allclose(s_scale, torch.tensor([-0.375]))
    assert [float(t) for t in normal_fisher_information(scale)] == [0.25, 0.5]
    b = leave_one_out_baseline(torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]]), 0)
    assert torch.allclose(b, torch.tensor([[4.0, 3.5], [3.0, 1.5], [2.0, 4.0]]))
