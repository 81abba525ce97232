"""The closed-form KLs this package registers, checked against Monte Carlo, and kl_report: which latent
sites TraceMeanField_ELBO gives an analytic KL and which fall back to Monte Carlo.

Statistical tests: seeded; each compares a closed form with the mean of 100,000 draws of log q - log p and
allows 5 standard errors of that mean (false-failure rate about 6e-7 per comparison)."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae.infer.kl import KLReport, kl_report

D = 3


def diag_normal():
    return dist.Normal(torch.tensor([0.3, -0.5, 1.0]), torch.tensor([0.7, 1.3, 0.4])).to_event(1)


def low_rank():
    return dist.LowRankMultivariateNormal(torch.tensor([0.1, 0.2, -0.4]), torch.tensor([[0.5], [-0.3], [0.8]]),
                                          torch.tensor([0.6, 1.1, 0.9]))


def full():
    tril = torch.tensor([[1.0, 0.0, 0.0], [0.4, 0.8, 0.0], [-0.3, 0.2, 1.2]])
    return dist.MultivariateNormal(torch.tensor([0.2, 0.0, -0.3]), scale_tril=tril)


@pytest.mark.parametrize("q, p", [(diag_normal, low_rank), (low_rank, diag_normal), (full, diag_normal)],
                         ids=["diag-lowrank", "lowrank-diag", "mvn-diag"])
def test_registered_kl_matches_monte_carlo(q, p):
    q, p = q(), p()
    closed = kl_divergence(q, p)
    assert closed.shape == ()
    z = q.sample((100_000,))
    terms = q.log_prob(z) - p.log_prob(z)
    se = terms.std() / terms.numel() ** 0.5
    assert abs(float(closed - terms.mean())) < 5 * float(se), (float(closed), float(terms.mean()), float(se))


def test_registered_kl_broadcasts_over_a_batch():
    q = dist.Normal(torch.randn(5, D), torch.rand(5, D) + 0.5).to_event(1)
    kl = kl_divergence(q, low_rank())
    assert kl.shape == (5,)
    for i in range(5):
        qi = dist.Normal(q.base_dist.loc[i], q.base_dist.scale[i]).to_event(1)
        assert torch.allclose(kl[i], kl_divergence(qi, low_rank()), atol=1e-5)


def test_non_normal_independent_is_not_claimed():
    with pytest.raises(NotImplementedError):
        kl_divergence(dist.Laplace(torch.zeros(D), 1.0).to_event(1), low_rank())


@pytest.fixture(scope="module")
def digits():
    return pyro_vae.data.load("digits").train.x.flatten(1)[:64]


@pytest.mark.parametrize("prior, method", [
    ("normal", "analytic"), ("laplace", "analytic"), ("mixture", "monte carlo"), ("vamp", "monte carlo"),
    ("flow", "monte carlo"), ("student-t", "monte carlo"),
    (lambda: low_rank(), "analytic"), (lambda: full(), "analytic"),
])
def test_kl_report_per_prior(prior, method, digits):
    vae = pyro_vae.VAE((64,), D, prior=prior, likelihood="continuous-bernoulli", hidden=(16,))
    report = kl_report(vae, digits[:10])
    assert isinstance(report, KLReport) and [s.site for s in report.sites] == ["z"]
    assert report["z"].method == method
    assert (report.analytic if method == "analytic" else report.monte_carlo) == ["z"]


def test_kl_report_analytic_value_is_the_closed_form(digits):
    vae = pyro_vae.VAE((64,), D, likelihood="continuous-bernoulli", hidden=(16,))
    x = digits[:10]
    with torch.no_grad():
        expected = float(kl_divergence(vae.encoder.distribution(x), vae.prior()).sum()) / 10
    assert kl_report(vae, x)["z"].kl == pytest.approx(expected, rel=1e-5)


def test_kl_report_categorical_falls_back_to_monte_carlo(digits):
    vae = pyro_vae.VAE((64,), 3, latent="categorical", categories=4, likelihood="continuous-bernoulli",
                       hidden=(16,))
    report = kl_report(vae, digits[:10])
    assert report.monte_carlo == ["z"] and report.analytic == []
    text = str(report)
    assert 'site "z"' in text and "Monte Carlo" in text and "RelaxedOneHotCategorical" in text


def test_kl_report_on_a_plain_model_and_guide():
    def model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.StudentT(3.0, 0.0, 1.0))
        pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)

    def guide(x):
        pyro.sample("a", dist.Normal(pyro.param("m", torch.tensor(0.5)), 1.0))
        pyro.sample("b", dist.Normal(0.0, 2.0))

    report = kl_report(model, torch.tensor(1.0), guide=guide)
    assert report.analytic == ["a"] and report.monte_carlo == ["b"]
    assert report["a"].kl == pytest.approx(0.125)


def test_fit_logs_the_report_once_under_meanfield_only(digits, caplog):
    vae = pyro_vae.VAE((64,), 2, latent="categorical", categories=3, likelihood="continuous-bernoulli",
                       hidden=(8,))
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        pyro_vae.fit(vae, digits, elbo="meanfield", epochs=2, batch_size=32, progress=False, device="cpu")
    logged = [r.getMessage() for r in caplog.records if "TraceMeanField_ELBO" in r.getMessage()]
    assert len(logged) == 1 and "Monte Carlo" in logged[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        pyro_vae.fit(vae, digits, elbo="trace", epochs=1, batch_size=32, progress=False, device="cpu")
    assert not [r for r in caplog.records if "TraceMeanField_ELBO" in r.getMessage()]


def test_the_report_does_not_move_the_training_rng(digits):
    """Logging the report must not change a seeded run: meanfield fits with and without it agree."""
    import pyro_vae.train.loop as train

    def run():
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = pyro_vae.VAE((64,), 2, likelihood="continuous-bernoulli", hidden=(8,))
        pyro_vae.fit(vae, digits, elbo="meanfield", epochs=1, batch_size=32, progress=False, device="cpu", seed=1)
        return [p.detach().clone() for p in vae.parameters()]

    with_report = run()
    original = train._fit_start
    try:
        train._fit_start = lambda state, callbacks, *a: [cb.on_fit_start(state) for cb in callbacks
                                                         if hasattr(cb, "on_fit_start")]
        without = run()
    finally:
        train._fit_start = original
    assert all(torch.equal(a, b) for a, b in zip(with_report, without))
