"""Gradient estimators: the score-function wrapper and handler on plated, ``to_event`` sites, the closed-form
one-sample variances of pathwise and score-function gradients, estimator selection in ``fit`` and the CLI.

Statistical tests are seeded; each compares with a closed form at 4 standard errors of the estimate, a
false-failure rate of about 6e-5 per comparison under the normal approximation."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import make_elbo, make_estimator_elbo
from pyro_vae.infer.estimators import (
    ESTIMATORS,
    EstimatorTrace_ELBO,
    EstimatorTraceGraph_ELBO,
    ScoreFunction,
    score_function,
)
from pyro_vae.models.linear_gaussian import linear_gaussian_vae


def _plated_guide(loc: torch.Tensor, scale: torch.Tensor):
    def guide():
        with pyro.plate("outer", loc.shape[0], dim=-2), pyro.plate("inner", loc.shape[1], dim=-1):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))
    return guide


def test_score_function_site_inside_plates_with_to_event():
    loc = torch.zeros(3, 4, 2, requires_grad=True)
    scale = torch.ones(3, 4, 2)
    tr = poutine.trace(score_function(_plated_guide(loc, scale))).get_trace()
    site = tr.nodes["z"]
    assert isinstance(site["fn"], ScoreFunction) and not site["fn"].has_rsample
    assert site["fn"].batch_shape == (3, 4) and site["fn"].event_shape == (2,)
    assert site["value"].shape == (3, 4, 2) and not site["value"].requires_grad
    tr.compute_score_parts()
    parts = site["score_parts"]
    assert parts.score_function.shape == (3, 4)
    assert torch.is_tensor(parts.score_function) and parts.entropy_term == 0
    assert torch.allclose(parts.log_prob, dist.Normal(loc, scale).to_event(1).log_prob(site["value"]))
    # expand (as a broadcasting plate does) and to_event keep the wrapper
    wrapped = ScoreFunction(dist.Normal(torch.zeros(2), 1.0)).expand((5, 2)).to_event(1)
    assert wrapped.batch_shape == (5,) and wrapped.event_shape == (2,) and not wrapped.has_rsample


def test_handler_leaves_unselected_and_observed_sites_alone():
    def guide():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(a + b, 1.0), obs=torch.tensor(0.0))
    tr = poutine.trace(score_function(guide, sites=["a"])).get_trace()
    assert isinstance(tr.nodes["a"]["fn"], ScoreFunction)
    assert not isinstance(tr.nodes["b"]["fn"], ScoreFunction)
    assert not isinstance(tr.nodes["obs"]["fn"], ScoreFunction)
    tr = poutine.trace(score_function(guide, baseline="decaying")).get_trace()
    assert tr.nodes["a"]["infer"]["baseline"]["use_decaying_avg_baseline"]


def test_score_function_gradient_is_reinforce_by_hand():
    """One sample under Trace_ELBO(score_function(guide)) equals the REINFORCE formula on a plated site."""
    x = torch.randn(5, 3)
    loc = torch.randn(5, 3, requires_grad=True)
    scale = torch.full((5, 3), 0.7)

    def model():
        with pyro.plate("data", 5):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide():
        with pyro.plate("data", 5):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    traced = poutine.trace(score_function(guide))
    loss = Trace_ELBO().differentiable_loss(model, traced)
    (grad,) = torch.autograd.grad(loss, [loc])
    z = traced.trace.nodes["z"]["value"]
    log_r = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z, 1.0).log_prob(x).sum(-1)
             - dist.Normal(loc, scale).log_prob(z).sum(-1)).detach()
    expected = -(log_r[:, None] * (z - loc) / scale**2)  # gradient of the loss = -ELBO
    assert torch.allclose(grad, expected.detach(), atol=1e-5, rtol=1e-5)


def _variance_and_se(g: torch.Tensor) -> tuple[float, float]:
    g = g.double()
    c = g - g.mean()
    var = float(c.pow(2).mean())
    m4 = float(c.pow(4).mean())
    return var, math.sqrt(max(m4 - var**2, 0.0) / g.numel())


@pytest.mark.parametrize("estimator, expected", [("pathwise", (4.0, 8.0)), ("score-function", (15.0, 74.0))])
def test_closed_form_one_sample_variances(estimator, expected):
    """x ~ N(mu, sigma^2), f(x) = (x - k)^2 at mu = sigma = k = 1. Pathwise: d/dmu = 2 sigma eps, variance 4;
    d/dsigma = 2 sigma eps^2, variance 4 Var(eps^2) = 8. Score function: f d/dmu log q = eps^3, variance
    E[eps^6] = 15; f d/dsigma log q = eps^4 - eps^2, variance E[(eps^4 - eps^2)^2] - 2^2 = 78 - 4 = 74.
    Both means are (0, 2) = grad of E f = (2 (mu - k), 2 sigma). The per-sample gradients come from Pyro's own
    score parts of the traced site, one independent draw per plate entry."""
    n = 200_000
    mu = torch.ones(n, requires_grad=True)
    sigma = torch.ones(n, requires_grad=True)

    def guide():
        with pyro.plate("samples", n):
            return pyro.sample("x", dist.Normal(mu, sigma))

    handled = score_function(guide) if estimator == "score-function" else guide
    tr = poutine.trace(handled).get_trace()
    tr.compute_score_parts()
    x = tr.nodes["x"]["value"]
    f = (x - 1.0) ** 2
    _, score, _ = tr.nodes["x"]["score_parts"]
    surrogate = f.sum() if estimator == "pathwise" else (f.detach() * score).sum()
    surrogate.backward()
    for g, var_expected, mean_expected in zip((mu.grad, sigma.grad), expected, (0.0, 2.0)):
        var, se = _variance_and_se(g)
        assert abs(var - var_expected) < 4 * se, (var, var_expected, se)
        mean_se = math.sqrt(var / n)
        assert abs(float(g.double().mean()) - mean_expected) < 4 * mean_se


def test_make_estimator_elbo_picks_pyro_elbos():
    assert isinstance(make_estimator_elbo("score-function"), EstimatorTrace_ELBO)
    elbo = make_estimator_elbo("score-function-baseline", num_particles=4)
    assert isinstance(elbo, TraceGraph_ELBO) and isinstance(elbo, EstimatorTraceGraph_ELBO)
    assert elbo.vectorize_particles and elbo.num_particles == 4
    nb = make_estimator_elbo("score-function-neural-baseline", data_shape=(5,))
    assert len(nb.extra_modules()) == 1
    assert set(ESTIMATORS) >= {"pathwise", "score-function", "score-function-baseline", "straight-through"}


def test_bad_estimator_choices_raise_clear_errors():
    with pytest.raises(ConfigError, match="estimator"):
        make_estimator_elbo("reinforce")
    with pytest.raises(ConfigError, match="drops the score-function term"):
        make_estimator_elbo("score-function", elbo="meanfield")
    with pytest.raises(ConfigError, match="data_shape"):
        make_estimator_elbo("score-function-neural-baseline")
    vae = linear_gaussian_vae()
    with pytest.raises(ConfigError, match="relaxed one-hot categorical"):
        make_estimator_elbo("straight-through").loss(vae.model, vae.guide, torch.randn(4, 5))
    with pytest.raises(ConfigError, match="categorical latents"):
        pyro_vae.fit(vae, torch.randn(8, 5), estimator="relaxed", epochs=1, progress=False, device="cpu")


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_make_elbo_and_its_alias_build_the_same_elbo(estimator, elbo):
    """make_estimator_elbo(estimator, elbo, n) is make_elbo(elbo, n, estimator): same class, same settings, or the
    same error in the same words."""
    def build(factory, *args):
        try:
            return factory(*args, data_shape=(5,))
        except ConfigError as e:
            return str(e)

    a = build(make_elbo, elbo, 3, estimator)
    b = build(make_estimator_elbo, estimator, elbo, 3)
    if isinstance(a, str):  # a score-function estimator under the mean-field ELBO, or one of the IWAE bound
        assert a == b and ("drops the score-function term" in a or "an estimator of the ELBO" in a)
        return
    assert type(a) is type(b)
    settings = [(e.num_particles, e.vectorize_particles, e.max_plate_nesting) for e in (a, b)]
    assert settings[0] == settings[1] and settings[0][:2] == (3, True)
    assert getattr(a, "estimator", None) == getattr(b, "estimator", None)
    if estimator == "pathwise":  # Pyro's own loss: the pathwise estimator changes no site, only checks rsample
        assert isinstance(a, {"trace": Trace_ELBO, "meanfield": pyro.infer.TraceMeanField_ELBO}[elbo])
        from pyro_vae.infer.losses import fast_kind

        assert fast_kind(a) is {"trace": Trace_ELBO, "meanfield": pyro.infer.TraceMeanField_ELBO}[elbo]


@pytest.mark.parametrize("args, match", [
    (dict(estimator="reinforce"), "estimator: expected one of"),
    (dict(elbo="trace_graph"), 'elbo: expected "trace" or "meanfield"'),
    (dict(num_particles=0), "num_particles: expected an integer >= 1"),
    (dict(num_particles=True), "num_particles: expected an integer >= 1"),
    (dict(estimator="score-function", elbo="meanfield"), "drops the score-function term"),
    (dict(estimator="score-function-neural-baseline"), "data_shape"),
    (dict(elbo=Trace_ELBO(), estimator="score-function"), '"pathwise" when elbo is an ELBO object'),
])
def test_make_elbo_and_its_alias_raise_the_same_error(args, match):
    full = dict(estimator="pathwise", elbo="trace", num_particles=1)
    full.update(args)
    with pytest.raises(ConfigError, match=match) as e1:
        make_elbo(full["elbo"], full["num_particles"], full["estimator"])
    with pytest.raises(ConfigError, match=match) as e2:
        make_estimator_elbo(full["estimator"], full["elbo"], full["num_particles"])
    assert str(e1.value) == str(e2.value)


def test_score_function_elbo_on_vae_matches_loss_value():
    """The estimator changes the gradient, not the ELBO estimate: same seed, same loss."""
    vae = linear_gaussian_vae()
    x = torch.randn(6, 5)
    values = []
    for est in ("pathwise", "score-function", "score-function-baseline"):
        pyro.set_rng_seed(3)
        values.append(make_estimator_elbo(est).loss_and_grads(vae.model, vae.guide, x))
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(values[2], rel=1e-6)


@pytest.mark.parametrize("estimator", ["score-function", "score-function-baseline", "score-function-neural-baseline"])
def test_fit_with_estimator(estimator):
    x = torch.rand(100, 6)
    vae = pyro_vae.VAE((6,), 2, likelihood="continuous-bernoulli", hidden=(8,))
    seen = []

    class Watch:
        def on_step(self, state):
            weights = (vae.encoder.net.mlp.net[0].weight, vae.decoder.mlp.net[0].weight)
            seen.append([p.detach().clone() for p in weights])

    history = pyro_vae.fit(vae, x, estimator=estimator, epochs=2, batch_size=32, progress=False, device="cpu",
                           val_data=x[:20], callbacks=[Watch()])
    assert len(history) == 2 and all(math.isfinite(v) for v in history["val_elbo"])
    # every step (validation is off after the first) moves both networks
    assert len(seen) == 8
    assert all(not torch.equal(a, b) for prev, cur in zip(seen, seen[1:]) for a, b in zip(prev, cur))


def test_cli_train_estimator(tmp_path):
    from pyro_vae import cli

    out = tmp_path / "run"
    code = cli.main(["train", "--estimator", "score-function-baseline", "--epochs", "1", "--z-dim", "2",
                     "--hidden", "8", "--batch-size", "256", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert code == 0
    cfg = pyro_vae.checkpoint.read_json(out / "config.json")
    assert cfg["train"]["estimator"] == "score-function-baseline" and cfg["train"]["elbo"] == "trace"
