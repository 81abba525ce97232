"""The per-site estimators (control variates, leave-one-out, measure-valued) on the linear-Gaussian VAE, whose ELBO
gradient is known in closed form, with Monte Carlo and analytic KL; where they are refused; fit and gradient samples.

Seeded statistical tests: the mean of the gradient samples is compared with the exact gradient at 4 standard errors
per coordinate, a false-failure rate of about 6e-5 per coordinate under the normal approximation (about 2.5e-3 per
estimator over the 39 parameters). The delta method is exact for the encoder here (the cost is quadratic in z): its
encoder samples are compared with the exact gradient to float32 precision instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import ESTIMATORS, SiteGradient
from pyro_vae.infer.site_gradients import SiteGradientTrace_ELBO, SiteGradientTraceMeanField_ELBO, evaluations
from pyro_vae.infer.variance import exact_gradient, gradient_samples, gradient_statistics
from pyro_vae.models.linear_gaussian import linear_gaussian_vae

NEW = ["score-function-mean-baseline", "score-function-optimal-cv", "score-function-delta-cv", "rloo",
       "measure-valued"]


def _setup():
    vae = linear_gaussian_vae(data_dim=5, z_dim=2, seed=1)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    return vae, x


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
@pytest.mark.parametrize("estimator", NEW)
def test_mean_is_the_exact_elbo_gradient(estimator, elbo):
    vae, x = _setup()
    exact = exact_gradient(vae, x)
    particles = 3 if estimator == "rloo" else 1
    if estimator == "score-function-delta-cv":
        g = gradient_samples(vae, x, estimator, 200, elbo=elbo, groups=True, seed=0)
        enc = exact[: g["encoder"].shape[1]]
        assert torch.allclose(g["encoder"], enc.expand_as(g["encoder"]), rtol=1e-4, atol=1e-3)
        stats = gradient_statistics(vae, x, estimator, 2000, elbo=elbo, exact=exact, seed=0)
        assert stats["decoder"]["max_bias_z"] < 4.0, stats["decoder"]
        return
    stats = gradient_statistics(vae, x, estimator, 3000, num_particles=particles, elbo=elbo, exact=exact, seed=0)
    assert stats["all"]["max_bias_z"] < 4.0, stats["all"]
    assert stats["all"]["dim"] == 39


@pytest.mark.parametrize("estimator", ["measure-valued", "rloo"])
def test_loop_and_vectorized_agree(estimator):
    """Pyro's loss_and_grads (the reference) and the vmapped surrogate draw from the same distribution: means within
    4.5 standard errors of their difference per coordinate (coordinates with no variance left out)."""
    vae, x = _setup()
    particles = 2 if estimator == "rloo" else 1
    loop = gradient_samples(vae, x, estimator, 300, num_particles=particles, method="loop", seed=0).double()
    vec = gradient_samples(vae, x, estimator, 1200, num_particles=particles, seed=1).double()
    se = (loop.var(0) / loop.shape[0] + vec.var(0) / vec.shape[0]).sqrt()
    live = se > 1e-6
    assert float(((loop.mean(0) - vec.mean(0)).abs()[live] / se[live]).max()) < 4.5


def test_measure_valued_is_below_the_score_function_on_the_encoder():
    vae, x = _setup()
    mv = gradient_statistics(vae, x, "measure-valued", 500, seed=0)["encoder"]["mean_variance"]
    sf = gradient_statistics(vae, x, "score-function", 500, seed=0)["encoder"]["mean_variance"]
    assert mv < sf / 5


def test_elbo_classes_and_guide_wrapper():
    assert type(make_elbo("trace", 1, "measure-valued")) is SiteGradientTrace_ELBO
    assert type(make_elbo("meanfield", 2, "rloo")) is SiteGradientTraceMeanField_ELBO
    vae, x = _setup()
    loss_fn = make_elbo("meanfield", 1, "measure-valued")
    torch.manual_seed(0)
    value = loss_fn.loss_and_grads(vae.model, vae.guide, x)
    torch.manual_seed(0)
    assert value == pytest.approx(make_elbo("meanfield").loss(vae.model, vae.guide, x), rel=1e-5)
    from pyro import poutine

    from pyro_vae.infer.estimators import EstimatorMessenger

    tr = poutine.trace(EstimatorMessenger("measure-valued", "guide")(vae.guide)).get_trace(x)
    assert isinstance(tr.nodes["z"]["fn"], SiteGradient) and not tr.nodes["z"]["value"].requires_grad
    assert evaluations(ESTIMATORS["measure-valued"], 2) == 9 and evaluations(ESTIMATORS["rloo"], 2) == 1


def test_refused_where_they_do_not_apply():
    cat = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5)
    xc = (torch.rand(3, 6) > 0.5).float()
    for est in ("measure-valued", "score-function-optimal-cv", "score-function-delta-cv"):
        with pytest.raises(ConfigError, match=rf'estimator "{est}" at site "z".*a Normal guide distribution'):
            make_elbo("trace", 1, est).loss_and_grads(cat.model, cat.guide, xc)
    vae, x = _setup()
    with pytest.raises(ConfigError, match=r'estimator "rloo" at site "z": expected K >= 2 vectorized particles'):
        gradient_samples(vae, x, "rloo", 2)
    with pytest.raises(ConfigError, match="K >= 2"):
        gradient_samples(vae, x, "rloo", 2, method="loop")


def test_leave_one_out_and_mean_baseline_on_categorical_latents_run_on_the_exact_categorical():
    cat = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5)
    xc = (torch.rand(3, 6) > 0.5).float()
    for est, k in (("rloo", 2), ("score-function-mean-baseline", 1)):
        g = gradient_samples(cat, xc, est, 4, num_particles=k, method="loop", seed=0)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("estimator, particles", [("measure-valued", 1), ("rloo", 2),
                                                  ("score-function-optimal-cv", 1)])
def test_fit_with_the_new_estimators(estimator, particles):
    x = torch.rand(64, 6)
    vae = pyro_vae.VAE((6,), 2, likelihood="continuous-bernoulli", hidden=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = pyro_vae.fit(vae, x, estimator=estimator, num_particles=particles, epochs=1, batch_size=32,
                               progress=False, device="cpu")
    assert len(history) == 1


def test_enumeration_counts_its_model_evaluations_by_the_values_per_variable():
    from pyro_vae.infer.estimators import get_estimator
    from pyro_vae.infer.site_gradients import evaluations

    est = get_estimator("enumerate")
    assert evaluations(est, 4) == 1 + 2 ** 4  # 4 bits
    assert evaluations(est, 3, values=10) == 1 + 10 ** 3  # 3 categorical variables of 10 classes
    assert evaluations(get_estimator("arm"), 200) == 2
