"""ELBO objects passed to make_elbo, evaluate_elbo and fit: which ones report the ELBO (is_elbo), the one-particle
ELBO fit reports for any other objective, and num_particles with an object or with "iwae".

The statistical test is seeded; its tolerance is 4 standard errors of the mean of 30 per-epoch estimates
(t with 29 degrees of freedom: a false failure about once in 2500 seeds)."""

import math

import pyro
import pytest
import torch
from pyro.infer import (
    JitTrace_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
)

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import ELBO_CLASSES, evaluate_elbo, is_elbo, make_elbo, make_estimator_elbo, reporting_elbo
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.models.linear_gaussian import exact_elbo, exact_log_likelihood, linear_gaussian_vae


class _SameAsTrace(Trace_ELBO):
    """A subclass that changes nothing: its value is not known to be the ELBO (only listed classes are)."""


def _lg():
    pyro.clear_param_store()
    return linear_gaussian_vae(5, 2, seed=3)


def _x(n=32):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loss_fn, expected", [
    (Trace_ELBO(), True), (TraceMeanField_ELBO(), True), (TraceGraph_ELBO(), True), (TraceEnum_ELBO(), True),
    (JitTrace_ELBO(), True), (make_elbo("trace", 3), True), (make_elbo("meanfield"), True),
    (make_estimator_elbo("score-function-baseline"), True), (make_estimator_elbo("rloo", "trace", 2), True),
    (RenyiELBO(alpha=0.0, num_particles=10), False), (RenyiELBO(alpha=0.5), False),
    (TraceTailAdaptive_ELBO(num_particles=2, vectorize_particles=True), False),
    (ImportanceWeightedELBO(1), False), (make_elbo("iwae", 5), False), (_SameAsTrace(), False),
])
def test_is_elbo(loss_fn, expected):
    assert is_elbo(loss_fn) is expected
    assert (type(loss_fn) in ELBO_CLASSES) is expected
    reported = reporting_elbo(loss_fn)
    assert reported is loss_fn if expected else (type(reported) is Trace_ELBO and reported.num_particles == 1)


def test_pyro_refuses_renyi_alpha_one():
    """Renyi's bound of order 1 would be the ELBO; Pyro refuses it, so every RenyiELBO is a bound."""
    with pytest.raises(ValueError):
        RenyiELBO(alpha=1.0)


def test_fit_under_renyi_reports_the_elbo():
    """Under RenyiELBO(alpha=0, K=10) (the IWAE bound, about -12 nats here) train_elbo and val_elbo are the ELBO
    (about -26 nats): the parameters barely move (lr=1e-12), so each epoch's train_elbo is an unbiased one-particle
    estimate of the exact mean ELBO, as is val_elbo; train_objective is the bound, above log p(x)'s Jensen gap."""
    x = _x()
    lg = _lg()
    elbo = exact_elbo(lg, x).mean().item()
    log_p = exact_log_likelihood(lg, x).mean().item()
    assert log_p - elbo > 10  # the bound and the ELBO are far apart here
    h = pyro_vae.fit(lg, x, elbo=RenyiELBO(alpha=0.0, num_particles=10), epochs=30, lr=1e-12, batch_size=32,
                     val_data=x, progress=False)
    for name in ("train_elbo", "val_elbo"):
        v = torch.tensor(h[name], dtype=torch.float64)
        se = v.std().item() / math.sqrt(len(v))
        assert abs(v.mean().item() - elbo) < 4 * se, (name, v.mean().item(), elbo, se)
    objective = torch.tensor(h["train_objective"], dtype=torch.float64)
    assert elbo < objective.mean().item() <= log_p + 1.0


def test_fit_under_renyi_reports_what_iwae_reports():
    """The same mechanism as elbo="iwae": with one minibatch and one epoch, the same draws and the same numbers."""
    x = _x()
    runs = []
    for elbo, k in ((RenyiELBO(alpha=0.0, num_particles=10), None), ("iwae", 10)):
        h = pyro_vae.fit(_lg(), x, elbo=elbo, num_particles=k, epochs=1, lr=1e-12, batch_size=32, progress=False)
        runs.append(h["train_elbo"][0])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_fit_reports_an_unknown_class_through_trace_elbo():
    """A class not in ELBO_CLASSES is reported through a one-particle Trace_ELBO; for a subclass that changes
    nothing, from the same draws as the step, that is the step's own loss."""
    x = _x()
    h = pyro_vae.fit(_lg(), x, elbo=_SameAsTrace(max_plate_nesting=1), epochs=1, lr=1e-12, batch_size=32,
                     val_data=x, progress=False)
    assert h["train_elbo"][0] == pytest.approx(h["train_objective"][0], rel=1e-6)
    assert math.isfinite(h["val_elbo"][0])


@pytest.mark.parametrize("elbo, found", [
    ("iwae", "importance-weighted bound"),
    (make_elbo("iwae", 3), "ImportanceWeightedELBO(num_particles=3), the importance-weighted bound"),
    (ImportanceWeightedELBO(1), "ImportanceWeightedELBO(num_particles=1)"),
    (RenyiELBO(alpha=0.0, num_particles=50), "RenyiELBO(alpha=0.0, num_particles=50), Renyi's bound"),
    (_SameAsTrace(), "_SameAsTrace, a class whose value is not known to be the ELBO"),
])
def test_evaluate_elbo_refuses_what_is_not_the_elbo(elbo, found):
    with pytest.raises(ConfigError, match="an ELBO object whose value is the ELBO") as err:
        evaluate_elbo(_lg(), _x(8), elbo=elbo)
    assert found in str(err.value) and 'pass elbo="trace"' in str(err.value)
    assert "pyro_vae.log_likelihood(vae, data, K)" in str(err.value)


def test_num_particles_with_an_elbo_object():
    lg, x = _lg(), _x(8)
    with pytest.raises(ConfigError, match=r"num_particles: expected the ELBO object's own num_particles \(1\)") as e:
        make_elbo(Trace_ELBO(), num_particles=10)
    assert "Trace_ELBO(num_particles=10, ...)" in str(e.value) and 'elbo="trace", num_particles=10' in str(e.value)
    with pytest.raises(ConfigError, match='elbo="iwae", num_particles=4'):
        make_elbo(make_elbo("iwae", 3), 4)
    with pytest.raises(ConfigError, match="num_particles"):
        evaluate_elbo(lg, x, elbo=Trace_ELBO(num_particles=1), num_particles=100)
    with pytest.raises(ConfigError, match="num_particles"):
        pyro_vae.fit(lg, x, elbo=Trace_ELBO(num_particles=2), num_particles=3, epochs=1, progress=False)
    # not given, or the object's own: the object's particles
    assert make_elbo(Trace_ELBO(num_particles=4)).num_particles == 4
    assert make_elbo(Trace_ELBO(num_particles=4), 4).num_particles == 4
    assert math.isfinite(evaluate_elbo(lg, x, elbo=Trace_ELBO(num_particles=3), num_particles=3))
    # a name: 1 when not given
    assert make_elbo("trace").num_particles == 1 and make_elbo("meanfield").num_particles == 1


def test_iwae_needs_k():
    fix = "pass num_particles=K (e.g. 50, as pyro-vae train --objective iwae uses); K=1 is the ELBO"
    for call in (lambda: make_elbo("iwae"), lambda: make_estimator_elbo("dreg", "iwae"),
                 lambda: pyro_vae.fit(_lg(), _x(8), elbo="iwae", epochs=1, progress=False)):
        with pytest.raises(ConfigError, match='num_particles with elbo="iwae"') as err:
            call()
        assert fix in str(err.value)
    assert make_elbo("iwae", 1).num_particles == 1  # K = 1 on purpose stays allowed
    h = pyro_vae.fit(_lg(), _x(8), elbo="iwae", num_particles=1, epochs=1, progress=False)
    assert math.isfinite(h["train_objective"][0])
