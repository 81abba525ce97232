"""Per-site estimators on a guide whose later site is drawn given an earlier one (``z1 -> z2``): refused where the
estimator evaluates the cost at other values of a site with the later site held at its draw (biased there), kept
where it is unbiased for any guide; and a mean-field guide accepted by all. Also ``estimator`` given as a dict.

The Gaussian pair: model ``z1 ~ N(0, 1)``, ``z2 ~ N(z1, 1)``, ``x_d ~ N(z2, 1)`` (``D`` coordinates); guide
``z1 ~ N(a, exp(ls1))``, ``z2 ~ N(c z1 + e mean(x), exp(ls2))`` (hierarchical) or ``N(c a + e mean(x), exp(ls2))``
(mean-field). Its ELBO is Gaussian expectations in closed form (:func:`_exact_elbo`), differentiated by autograd for
the exact gradient.

Seeded statistical tests: each of the 5 gradient coordinates' sample mean is compared with the exact gradient at 4
standard errors of the mean, a false-failure rate of 6.3e-5 per coordinate under the normal approximation, about 3e-4
per estimator (Bonferroni over 5 coordinates).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import ESTIMATORS
from pyro_vae.infer.variance import gradient_samples

D = 3
X = torch.randn(4, D, generator=torch.Generator().manual_seed(0)) + 1.0
INIT = {"a": 0.3, "ls1": -0.2, "c": 0.7, "e": 0.5, "ls2": -0.5}
#: The per-site estimators that hold the other latents at their draws (refused on a dependent guide).
FIXED = sorted(e.name for e in ESTIMATORS.values() if e.site_gradient and e.fixed_sites)
GAUSSIAN_FIXED = ["score-function-mean-baseline", "score-function-optimal-cv", "score-function-delta-cv",
                  "measure-valued"]
BERNOULLI_FIXED = ["arm", "disarm", "enumerate", "muprop", "rebar", "relax"]


@pytest.fixture(autouse=True)
def _fresh_params():
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield
    pyro.clear_param_store()


class Gaussian(torch.nn.Module):
    """The two-site Gaussian model and its guide (``hier``: ``z2``'s mean computed from ``z1``'s value)."""

    def __init__(self, hier: bool) -> None:
        super().__init__()
        self.hier = hier
        self.data_shape = (D,)

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2.unsqueeze(-1), 1.0).expand(z2.shape + (D,)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        p = {k: pyro.param(k, torch.tensor(v)) for k, v in INIT.items()}
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(p["a"].expand(x.shape[:1]), p["ls1"].exp()))
            loc2 = (p["c"] * z1 if self.hier else p["c"] * p["a"]) + p["e"] * x.mean(-1)
            pyro.sample("z2", dist.Normal(loc2, p["ls2"].exp()))


def _exact_elbo(p: dict[str, torch.Tensor], hier: bool) -> torch.Tensor:
    """The ELBO of the batch ``X`` (nats, summed over points) in closed form: under the guide ``z1 ~ N(a, s1^2)`` and
    ``z2 = k z1 + m + s2 eps`` (``k = c`` hierarchical, 0 mean-field; ``E z2 = c a + m`` either way)."""
    s1, s2 = p["ls1"].exp(), p["ls2"].exp()
    m = p["e"] * X.mean(-1)
    k = p["c"] if hier else torch.zeros(())
    ez2 = p["c"] * p["a"] + m
    vz2 = k**2 * s1**2 + s2**2
    c0 = -0.5 * math.log(2 * math.pi)
    log_p_z1 = c0 - 0.5 * (p["a"] ** 2 + s1**2)
    log_p_z2 = c0 - 0.5 * ((k - 1) ** 2 * s1**2 + s2**2 + (ez2 - p["a"]) ** 2)  # E (z2 - z1)^2
    log_p_x = D * c0 - 0.5 * ((X - ez2.unsqueeze(-1)) ** 2).sum(-1) - 0.5 * D * vz2
    entropy = 0.5 * torch.log(2 * math.pi * math.e * s1**2) + 0.5 * torch.log(2 * math.pi * math.e * s2**2)
    return (log_p_z1 + log_p_z2 + log_p_x + entropy).sum()


def _exact_gradient(hier: bool) -> torch.Tensor:
    """The exact gradient of ``-ELBO`` in the column order of ``gradient_samples`` (the guide's params a, ls1, c, e,
    ls2, in the order the guide declares them)."""
    p = {k: torch.tensor(v, requires_grad=True) for k, v in INIT.items()}
    return torch.stack(torch.autograd.grad(-_exact_elbo(p, hier), list(p.values())))


def _check_mean(g: torch.Tensor, exact: torch.Tensor) -> None:
    g = g.double()
    se = g.std(0) / math.sqrt(g.shape[0])
    z = (g.mean(0) - exact.double()) / se
    assert bool((z.abs() < 4.0).all()), (g.mean(0), exact, z)


def _elbo_for(estimator: str, data_shape=(D,)):
    return make_elbo("trace", 2 if estimator == "rloo" else 1, estimator, data_shape=data_shape)


# ------------------------------------------------------------------------------------------ refused
def test_every_fixed_site_estimator_is_listed():
    """Only the terms that read the cost at the draw itself (leave-one-out, NVIL) are unbiased on any guide."""
    assert set(FIXED) == set(GAUSSIAN_FIXED) | set(BERNOULLI_FIXED) | {"gumbel-rao"}
    assert not ESTIMATORS["rloo"].fixed_sites and not ESTIMATORS["nvil"].fixed_sites


def _refused(excinfo, estimator: str, site: str, later: str) -> None:
    text = str(excinfo.value)
    for part in (f'estimator "{estimator}" at site "{site}"', f'guide site "{later}"', '"rloo"', '"score-function"',
                 "mean-field"):
        assert part in text, text


@pytest.mark.parametrize("estimator", GAUSSIAN_FIXED)
def test_gaussian_dependent_guide_refused_by_make_elbo(estimator):
    pair = Gaussian(hier=True)
    with pytest.raises(ConfigError) as e:
        _elbo_for(estimator).loss_and_grads(pair.model, pair.guide, X)
    _refused(e, estimator, "z1", "z2")


@pytest.mark.parametrize("method", ["loop", "vectorized"])
@pytest.mark.parametrize("estimator", GAUSSIAN_FIXED)
def test_gaussian_dependent_guide_refused_by_gradient_samples(estimator, method):
    with pytest.raises(ConfigError) as e:
        gradient_samples(Gaussian(hier=True), X, estimator, 2, method=method, seed=0)
    _refused(e, estimator, "z1", "z2")


def test_fit_refuses_a_dependent_guide():
    with pytest.raises(ConfigError, match='estimator "measure-valued" at site "z1"'):
        pyro_vae.fit(pyro_vae.ModelGuidePair(Gaussian(hier=True).model, Gaussian(hier=True).guide), X,
                     estimator="measure-valued", epochs=1, progress=False)


@pytest.mark.parametrize("method", ["loop", "vectorized"])
def test_stl_refused_in_both_sampling_methods(method):
    """``stl`` on the dependent guide: refused at ``z2`` (whose parameters are computed from ``z1``) in the vectorized
    path too, as make_elbo's ELBO refuses it."""
    with pytest.raises(ConfigError, match='estimator "stl"/"dreg" at site "z2"'):
        gradient_samples(Gaussian(hier=True), X, "stl", 2, method=method, seed=0)


# ----------------------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("estimator,n", [("pathwise", 2000), ("score-function", 6000), ("rloo", 3000)])
def test_unbiased_estimators_accepted_on_the_dependent_guide(estimator, n):
    g = gradient_samples(Gaussian(hier=True), X, estimator, n, num_particles=2 if estimator == "rloo" else 1, seed=1)
    _check_mean(g, _exact_gradient(hier=True))


@pytest.mark.parametrize("estimator", ["rloo", "score-function", "pathwise"])
def test_unbiased_estimators_accepted_by_make_elbo(estimator):
    pair = Gaussian(hier=True)
    loss = _elbo_for(estimator).loss_and_grads(pair.model, pair.guide, X)
    assert math.isfinite(loss)


@pytest.mark.parametrize("estimator", [*GAUSSIAN_FIXED, "rloo", "pathwise", "score-function", "stl"])
def test_mean_field_guide_accepted_by_all(estimator):
    pair = Gaussian(hier=False)
    assert math.isfinite(_elbo_for(estimator).loss_and_grads(pair.model, pair.guide, X))
    for method in ("loop", "vectorized"):
        g = gradient_samples(pair, X, estimator, 2, num_particles=2 if estimator == "rloo" else 1, method=method,
                             seed=0)
        assert g.shape == (2, 5) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("estimator,n", [("measure-valued", 1500), ("score-function-mean-baseline", 1500)])
def test_mean_field_guide_mean_is_exact(estimator, n):
    g = gradient_samples(Gaussian(hier=False), X, estimator, n, seed=2)
    _check_mean(g, _exact_gradient(hier=False))


# ------------------------------------------------------------------------------------------ discrete
class Bernoulli2(torch.nn.Module):
    """Two Bernoulli sites per data point: guide ``b1 ~ Bern(sigmoid(t1))``, ``b2 ~ Bern(sigmoid(t2 + w b1))``
    (``hier``; ``t2`` alone otherwise); model ``b1 ~ Bern(1/2)``, ``b2 ~ Bern(sigmoid(2 b1 - 1))``, ``x ~ N(b2, 1)``."""

    def __init__(self, hier: bool) -> None:
        super().__init__()
        self.hier = hier
        self.data_shape = (1,)

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            b1 = pyro.sample("b1", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
            b2 = pyro.sample("b2", dist.Bernoulli(logits=2 * b1 - 1))
            pyro.sample("x", dist.Normal(b2, 1.0), obs=x[:, 0])

    def guide(self, x, num_data=None):
        t1, t2, w = (pyro.param(k, torch.tensor(v)) for k, v in (("t1", 0.3), ("t2", -0.4), ("w", 1.2)))
        with pyro.plate("data", x.shape[0]):
            b1 = pyro.sample("b1", dist.Bernoulli(logits=t1.expand(x.shape[:1])))
            pyro.sample("b2", dist.Bernoulli(logits=t2 + w * b1 if self.hier else t2.expand(x.shape[:1]) + 0 * w))


XB = torch.tensor([[0.2], [1.5], [-0.3]])


def _bernoulli_exact_gradient() -> torch.Tensor:
    """The gradient of ``-ELBO`` of the hierarchical Bernoulli pair by summing over the 4 configurations per point."""
    t1, t2, w = (torch.tensor(v, requires_grad=True) for v in (0.3, -0.4, 1.2))
    x = XB[:, 0]
    elbo = torch.zeros(())
    for b1 in (0.0, 1.0):
        for b2 in (0.0, 1.0):
            b1t, b2t = torch.tensor(b1), torch.tensor(b2)
            log_q = dist.Bernoulli(logits=t1).log_prob(b1t) + dist.Bernoulli(logits=t2 + w * b1t).log_prob(b2t)
            log_p = (math.log(0.5) + dist.Bernoulli(logits=2 * b1t - 1).log_prob(b2t)
                     + dist.Normal(b2t, 1.0).log_prob(x))
            elbo = elbo + (log_q.exp() * (log_p - log_q)).sum()
    return torch.stack(torch.autograd.grad(-elbo, [t1, t2, w]))


@pytest.mark.parametrize("estimator", BERNOULLI_FIXED)
def test_bernoulli_dependent_guide_refused_by_make_elbo(estimator):
    pair = Bernoulli2(hier=True)
    with pytest.raises(ConfigError) as e:
        _elbo_for(estimator, (1,)).loss_and_grads(pair.model, pair.guide, XB)
    _refused(e, estimator, "b1", "b2")


@pytest.mark.parametrize("method", ["loop", "vectorized"])
def test_arm_dependent_guide_refused_by_gradient_samples(method):
    with pytest.raises(ConfigError) as e:
        gradient_samples(Bernoulli2(hier=True), XB, "arm", 2, method=method, seed=0)
    _refused(e, "arm", "b1", "b2")


@pytest.mark.parametrize("method", ["loop", "vectorized"])
def test_arm_accepts_the_mean_field_bernoulli_guide(method):
    g = gradient_samples(Bernoulli2(hier=False), XB, "arm", 2, method=method, seed=0)
    assert g.shape == (2, 3) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("estimator", ["rloo", "nvil"])
def test_discrete_unbiased_estimators_accepted_on_the_dependent_guide(estimator):
    """RLOO and NVIL (a fresh baseline, 0, and running statistics at 0 and 1: the plain score function) read the
    cost at the draw only: their mean is the exact gradient (summed over the 4 configurations per point)."""
    g = gradient_samples(Bernoulli2(hier=True), XB, estimator, 3000, num_particles=2 if estimator == "rloo" else 1,
                         seed=3)
    _check_mean(g, _bernoulli_exact_gradient())


# ------------------------------------------------------------------------------------- dict estimator
@pytest.mark.parametrize("estimator", [{"z": "rloo"}, ["rloo"], None])
def test_estimator_that_is_not_a_name_refused(estimator):
    from pyro_vae.models.linear_gaussian import linear_gaussian_vae

    vae = linear_gaussian_vae(5, 2)
    x = torch.randn(4, 5)
    calls = [lambda: make_elbo("trace", 2, estimator), lambda: gradient_samples(vae, x, estimator, 2)]
    if estimator is not None:  # fit's estimator=None is its default estimator
        calls.append(lambda: pyro_vae.fit(vae, x, estimator=estimator, epochs=1, progress=False))
    for call in calls:
        with pytest.raises(ConfigError, match="estimator: expected one name of ESTIMATORS") as e:
            call()
        assert type(estimator).__name__ in str(e.value) and "one estimator name per call" in str(e.value)


@pytest.mark.parametrize("estimator", ["rloo", "nvil", "score-function"])
def test_estimators_unbiased_on_any_guide_leave_its_draws_alone(estimator):
    """Only the estimators that need the dependency check hand the guide a stand-in that requires grad: under
    rloo, nvil and the score function, a guide that reads its draw's values (``.numpy()``) still runs under
    Pyro's validation."""
    seen = []

    def model(x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(b.unsqueeze(-1), 1.0).expand(b.shape + (D,)).to_event(1), obs=x)

    def guide(x, num_data=None):
        logit = pyro.param("logit", torch.tensor(0.2))
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=logit.expand(x.shape[:1])))
        seen.append(float(b.numpy().sum()))

    with pyro.validation_enabled(True):
        make_elbo("trace", 2 if estimator == "rloo" else 1, estimator, data_shape=(D,)).loss_and_grads(
            model, guide, X)
    assert seen and pyro.param("logit").grad is not None
