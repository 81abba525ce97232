"""Bernoulli latents (the sigmoid belief net layer): sites and values, the fixed and learned priors, the closed-form
KL, the relaxed (binary Concrete in logit space) and straight-through variants, the estimators that apply, the
configuration round trip, the command line, evaluation, and the exact enumeration of small Bernoulli VAEs.

Statistical tests are seeded; each compares a Monte Carlo mean with its exact value within 4 standard errors
(a false-failure rate of about 6e-5 per comparison under a normal approximation)."""

import itertools
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae.distributions.relaxed_bernoulli import LogitBernoulli, LogitRelaxedBernoulli, to_unit
from pyro_vae.errors import ConfigError
from pyro_vae.models.enumeration import (
    enumerate_latents,
    exact_elbo,
    exact_elbo_gradient,
    exact_iwae_bound,
    exact_log_likelihood,
    latent_configurations,
)


@pytest.fixture(scope="module")
def digits():
    return pyro_vae.data.load("digits", binarize_mode="static").train.x.flatten(1)[:256]


def make_vae(z_dim=4, **kw):
    kw.setdefault("hidden", (16,))
    return pyro_vae.VAE((64,), z_dim, latent="bernoulli", **kw)


def binary(n=8, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.4).float()


# ---------------------------------------------------------------------------------------- sites and values
@pytest.mark.parametrize("net", ["mlp", "linear", "nonlinear", "nonlinear-leaky"])
def test_guide_values_are_bits_and_sites_have_the_latent_shape(net):
    vae = make_vae(8, encoder=net, decoder=net)
    x = binary(5)
    guide = poutine.trace(vae.guide).get_trace(x)
    z = guide.nodes["z"]["value"]
    assert z.shape == (5, 8) and set(z.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(guide.nodes["z"]["fn"].base_dist, dist.Bernoulli)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    assert model.nodes["x"]["value"].shape == (5, 64)
    assert vae.latent_shape == (8,) and vae.encode(x).shape == (5, 8)
    assert bool(((vae.encode(x) > 0) & (vae.encode(x) < 1)).all())  # the probabilities of a 1


def test_fixed_networks_have_the_papers_layers():
    vae = make_vae(200, encoder="linear", decoder="nonlinear")
    linears = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 200)]
    dec = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Tanh))]
    assert [type(m).__name__ for m in dec] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    leaky = make_vae(3, encoder="nonlinear-leaky")
    acts = [m for m in leaky.encoder.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 2 and all(a.negative_slope == 0.3 for a in acts)


def test_priors_fixed_and_learned():
    fixed, learned = make_vae(prior="bernoulli"), make_vae(prior="bernoulli-learned")
    assert not list(fixed.prior.parameters())
    assert torch.allclose(fixed.prior().base_dist.probs, torch.full((4,), 0.5))
    assert [n for n, _ in learned.prior.named_parameters()] == ["logits"]
    assert torch.equal(learned.prior.logits, torch.zeros(4))
    assert make_vae().config["prior"] == {"name": "bernoulli"}  # the default
    with pytest.raises(ConfigError, match="normal"):
        make_vae(prior="normal")


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="relaxed"):
        pyro_vae.VAE((64,), 4, relaxed=True)
    with pytest.raises(ConfigError, match="categories"):
        make_vae(categories=3)


def test_sample_and_decode():
    vae = make_vae()
    assert vae.sample(7).shape == (7, 64)
    z = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert vae.decode(z).shape == (1, 64)
    assert make_vae(relaxed=True).sample(3).shape == (3, 64)


# ------------------------------------------------------------------------------------------------ KL
def test_kl_closed_form_is_registered_through_independent_and_equals_monte_carlo():
    torch.manual_seed(1)
    q = dist.Bernoulli(logits=torch.randn(3, 6)).to_event(1)
    p = dist.Bernoulli(logits=torch.randn(6)).to_event(1).expand([3])
    kl = kl_divergence(q, p)
    n = 20000
    z = q.sample((n,))
    terms = q.log_prob(z) - p.log_prob(z)
    se = terms.std(0) / math.sqrt(n)
    assert bool(((terms.mean(0) - kl).abs() < 4 * se).all())
    exact_q, exact_p = LogitBernoulli(logits=q.base_dist.logits), LogitBernoulli(logits=p.base_dist.logits)
    assert torch.allclose(kl_divergence(exact_q, exact_p).sum(-1), kl)


def test_kl_report_and_meanfield_elbo_use_the_closed_form():
    vae, x = make_vae(prior="bernoulli-learned"), binary(6)
    report = pyro_vae.infer.kl_report(vae, x)
    assert [(s.site, s.method) for s in report.sites] == [("z", "analytic")]
    # the per-site estimators run TraceMeanField_ELBO with the analytic KL of the Bernoulli sites
    elbo = pyro_vae.infer.make_elbo("meanfield", 2, "rloo")
    assert math.isfinite(float(elbo.loss(vae.model, vae.guide, x)))


# --------------------------------------------------------------------------------- relaxed variant
def test_logit_relaxed_bernoulli_density_integrates_to_one_and_is_finite_far_out():
    d = LogitRelaxedBernoulli(0.3, logits=torch.tensor(0.7, dtype=torch.float64))
    s = torch.linspace(-300, 300, 600001, dtype=torch.float64)
    assert abs(float(d.log_prob(s).exp().sum() * (s[1] - s[0])) - 1.0) < 1e-6
    far = d.log_prob(torch.tensor([1e4, -1e4], dtype=torch.float64))
    assert bool(torch.isfinite(far).all())
    assert torch.equal(d.log_prob(torch.tensor([math.inf, -math.inf], dtype=torch.float64)),
                       torch.full((2,), -math.inf, dtype=torch.float64))


def test_relaxed_sign_is_an_exact_bernoulli_draw():
    logits = torch.tensor([-1.0, 0.0, 2.0])
    d = LogitRelaxedBernoulli(0.5, logits=logits)
    n = 40000
    hits = (d.rsample((n,)) > 0).float()
    p = torch.sigmoid(logits)
    assert bool(((hits.mean(0) - p).abs() < 4 * (p * (1 - p) / n).sqrt()).all())


def test_relaxed_and_straight_through_decoder_inputs():
    z = torch.tensor([-2.0, 0.5], requires_grad=True)
    hard = to_unit(z, True)
    assert hard.tolist() == [0.0, 1.0]
    hard.sum().backward()
    assert torch.allclose(z.grad, torch.sigmoid(z) * (1 - torch.sigmoid(z)))
    vae = make_vae(straight_through=True)
    assert vae.relaxed and vae.straight_through
    guide = poutine.trace(vae.guide).get_trace(binary(3))
    assert isinstance(guide.nodes["z"]["fn"].base_dist, LogitRelaxedBernoulli)


# ---------------------------------------------------------------------------------------- estimators
ESTIMATORS = [
    ({}, None),  # exact latent: fit's default, the score function (an explicit "pathwise" is refused)
    ({}, "score-function"),
    ({}, "score-function-baseline"),
    ({}, "rloo"),
    ({"relaxed": True}, "pathwise"),
    ({"relaxed": True}, "relaxed"),
    ({"relaxed": True}, "straight-through"),
    ({"relaxed": True}, "score-function"),
]


@pytest.mark.parametrize("kw,estimator", ESTIMATORS)
def test_each_estimator_trains_and_the_loss_decreases(digits, kw, estimator):
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((64,), 16, latent="bernoulli", prior="bernoulli-learned", hidden=(64,), **kw)
    hist = pyro_vae.fit(vae, digits, epochs=6, batch_size=64, lr=3e-3, estimator=estimator,
                        num_particles=2 if estimator == "rloo" else 1, progress=False)
    elbos = [e["train_elbo"] for e in hist.epochs]
    assert all(math.isfinite(e) for e in elbos)
    assert elbos[-1] > elbos[0] + 1.0


# ----------------------------------------------------------------------------------- configuration
def test_config_round_trip_and_checkpoint(tmp_path):
    vae = make_vae(5, encoder="linear", decoder="nonlinear", prior="bernoulli-learned", relaxed=True,
                   temperature=0.5)
    cfg = json.loads(json.dumps(vae.config))
    assert cfg["latent"] == "bernoulli" and cfg["relaxed"] and cfg["temperature"] == 0.5
    again = pyro_vae.VAE.from_config(cfg)
    assert again.config == vae.config
    with torch.no_grad():
        vae.prior.logits.fill_(0.3)
    pyro_vae.save(vae, tmp_path / "run")
    loaded = pyro_vae.load(tmp_path / "run")
    assert loaded.config == vae.config and torch.equal(loaded.prior.logits, vae.prior.logits)


# -------------------------------------------------------------------------------------------- evaluation
def test_log_likelihood_is_finite_and_above_the_elbo_and_matches_enumeration():
    torch.manual_seed(0)
    vae, x = make_vae(4, prior="bernoulli-learned"), binary(16)
    ll = pyro_vae.evaluation.log_likelihood(vae, x, num_samples=200)
    assert math.isfinite(ll.mean) and ll.mean >= ll.elbo
    exact = exact_log_likelihood(vae, x)
    assert abs(ll.mean - float(exact.detach().mean())) < 0.05 + 4 * ll.se
    # the importance-sampled ELBO is an unbiased estimate of the exact one
    w = pyro_vae.evaluation.importance_log_weights(vae, x, 400)
    se = float(w.mean(1).std() / math.sqrt(len(x)) + w.std(1).mean() / math.sqrt(400 * len(x)))
    assert abs(float(w.mean()) - float(exact_elbo(vae, x).detach().mean())) < 4 * se + 1e-3


# ------------------------------------------------------------------------------------------ enumeration
def brute_force(vae, x):
    """ELBO and log p(x) per point by a Python loop over configurations, from the parts (an independent check)."""
    q_logits, p_logits = vae.encoder(x), vae.prior().base_dist.logits
    elbo, log_joint = 0.0, []
    for bits in itertools.product([0.0, 1.0], repeat=vae.z_dim):
        z = torch.tensor(bits).expand(len(x), vae.z_dim)
        log_q = dist.Bernoulli(logits=q_logits).log_prob(z).sum(-1)
        log_p = dist.Bernoulli(logits=p_logits).log_prob(z).sum(-1) + vae.decode_dist(z).log_prob(x)
        elbo = elbo + log_q.exp() * (log_p - log_q)
        log_joint.append(log_p)
    return elbo, torch.stack(log_joint).logsumexp(0)


def test_latent_configurations():
    c = latent_configurations(3)
    assert c.shape == (8, 3) and c[5].tolist() == [1.0, 0.0, 1.0]
    assert len({tuple(r) for r in c.tolist()}) == 8
    with pytest.raises(ConfigError, match="bits"):
        latent_configurations(40)


@pytest.mark.parametrize("z_dim", [2, 3])
def test_enumeration_equals_brute_force(z_dim):
    torch.manual_seed(z_dim)
    vae, x = make_vae(z_dim, prior="bernoulli-learned"), binary(5)
    with torch.no_grad():
        vae.prior.logits.copy_(torch.randn(z_dim))
    e = enumerate_latents(vae, x)
    assert e.log_q.shape == (2 ** z_dim, 5) and torch.allclose(e.log_q.exp().sum(0), torch.ones(5))
    elbo, log_px = brute_force(vae, x)
    assert torch.allclose(exact_elbo(vae, x), elbo, atol=1e-5)
    assert torch.allclose(exact_log_likelihood(vae, x), log_px, atol=1e-5)
    grads = exact_elbo_gradient(vae, x)
    params = [p for _, p in vae.named_parameters()]
    ref = torch.autograd.grad(elbo.sum(), params, allow_unused=True)
    for (name, g), r in zip(grads.items(), ref):
        assert torch.allclose(g, r if r is not None else torch.zeros_like(g), atol=1e-5), name
    assert set(grads) == {n for n, _ in vae.named_parameters()}


def test_enumeration_ignores_the_kl_weight_and_is_the_elbo_bound():
    vae, x = make_vae(3, beta=0.3), binary(4)
    e1 = exact_elbo(vae, x)
    assert vae.beta == 0.3  # restored after the enumeration
    vae.beta = 1.0
    assert torch.allclose(e1, exact_elbo(vae, x))
    ll = exact_log_likelihood(vae, x)
    bounds = [exact_iwae_bound(vae, x, k) for k in (1, 2, 3)]
    assert torch.allclose(bounds[0], e1, atol=1e-5)
    assert bool((bounds[0] <= bounds[1] + 1e-6).all() and (bounds[1] <= bounds[2] + 1e-6).all())
    assert bool((bounds[2] <= ll + 1e-6).all())


def test_iwae_bound_equals_brute_force_over_pairs():
    torch.manual_seed(3)
    vae, x = make_vae(2), binary(3)
    e = enumerate_latents(vae, x)
    ref = 0.0
    for i, j in itertools.product(range(4), repeat=2):
        prob = (e.log_q[i] + e.log_q[j]).exp()
        ref = ref + prob * (torch.stack([e.log_weights[i], e.log_weights[j]]).logsumexp(0) - math.log(2))
    assert torch.allclose(exact_iwae_bound(vae, x, 2), ref, atol=1e-5)


def test_enumeration_refuses_what_it_cannot_sum():
    with pytest.raises(ConfigError, match="Bernoulli"):
        exact_elbo(make_vae(3, relaxed=True), binary(2))
    pyro.clear_param_store()
    with pytest.raises(ConfigError, match="max_bits"):
        exact_elbo(make_vae(13), binary(2), max_bits=12)
    pyro.clear_param_store()
    with pytest.raises(ConfigError, match="Bernoulli"):
        exact_elbo(pyro_vae.VAE((64,), 2, hidden=(8,)), binary(2))


def test_enumeration_score_function_gradient_mean_matches(digits):
    """The mean of Pyro's score-function gradients of the batch ELBO equals the exact gradient of the prior logits,
    within 4 standard errors per coordinate. The standard error comes from 30 independent 800-particle estimates
    (a t statistic with 29 degrees of freedom): false-failure rate about 4e-4 per coordinate, 1.2e-3 for the
    three."""
    torch.manual_seed(0)
    vae = make_vae(3, prior="bernoulli-learned")
    x = digits[:4]
    exact = exact_elbo_gradient(vae, x)["prior.logits"]
    elbo = Trace_ELBO(num_particles=800, vectorize_particles=True, max_plate_nesting=1)
    # per-particle surrogate gradients: Trace_ELBO averages; recover the spread from batches of particles
    samples = []
    for _ in range(30):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        (g,) = torch.autograd.grad(-loss, [vae.prior.logits])
        samples.append(g)
    s = torch.stack(samples)
    se = s.std(0) / math.sqrt(len(s))
    assert bool(((s.mean(0) - exact).abs() < 4 * se + 1e-6).all())


# ------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("extra", [
    ["--net", "linear", "--prior", "bernoulli-learned", "--estimator", "score-function-baseline"],
    ["--relaxed", "--temperature", "0.7", "--anneal-rate", "1e-3", "--estimator", "relaxed"],
])
def test_cli_trains_a_bernoulli_latent_and_evaluates_it(tmp_path, extra):
    from pyro_vae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--binarize", "static", "--latent", "bernoulli", "--z-dim", "6",
                 "--hidden", "16", "--likelihood", "bernoulli", "--epochs", "2", "--batch-size", "256",
                 "--device", "cpu", "--no-progress", "--out", str(out), *extra]) == 0
    cfg = json.loads((out / "config.json").read_text())
    model_cfg = cfg["vae"]
    assert model_cfg["latent"] == "bernoulli" and model_cfg["relaxed"] == ("--relaxed" in extra)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train_elbo"]) and math.isfinite(metrics["test_elbo"])
    vae = pyro_vae.load(out)
    assert vae.latent == "bernoulli" and vae.sample(4).shape[0] == 4
    assert main(["evaluate", str(out), "--device", "cpu", "--iw-samples", "30"]) == 0


def test_cli_help_and_refusals(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bernoulli" in text and "nonlinear-leaky" in text and "--relaxed" in text
    assert main(["train", "--data", "digits", "--relaxed", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--relaxed" in capsys.readouterr().err


def test_relaxed_site_is_reparameterized_and_exact_under_score_function_estimators():
    vae, x = make_vae(3, relaxed=True), binary(4)
    q = poutine.trace(vae.guide).get_trace(x).nodes["z"]["fn"]
    assert q.has_rsample
    parts = q.score_parts(q.rsample())
    assert isinstance(parts.score_function, int) and parts.score_function == 0
    from pyro_vae.infer.estimators import EstimatorMessenger

    guide = poutine.trace(EstimatorMessenger("score-function", "guide")(vae.guide)).get_trace(x)
    z = guide.nodes["z"]["value"]
    assert bool(torch.isinf(z).all()) and not guide.nodes["z"]["fn"].has_rsample
    model = poutine.trace(poutine.replay(EstimatorMessenger("score-function", "model")(vae.model),
                                         trace=guide)).get_trace(x)
    assert isinstance(model.nodes["z"]["fn"].base_dist, LogitBernoulli)
    assert bool(torch.isfinite(model.nodes["z"]["fn"].log_prob(z)).all())


# ------------------------------------------------------------------------------- generation and imputation
@pytest.mark.parametrize("kw", [{}, {"relaxed": True}])
def test_generation_and_imputation_work_on_bernoulli_latents(kw):
    vae, x = make_vae(5, **kw), binary(12)
    assert pyro_vae.generation.sample(vae, 6, source="aggregate", data=x).shape == (6, 64)
    assert pyro_vae.generation.interpolate(vae, x[0], x[1], steps=4).shape == (4, 64)
    mask = pyro_vae.imputation.make_mask((64,), "bottom", 3)
    filled = pyro_vae.imputation.impute(vae, x[:3], mask)
    assert filled.shape == (3, 64) and torch.equal(filled[mask], x[:3][mask])


def test_relaxed_estimators_are_refused_on_an_exact_bernoulli_latent():
    vae = make_vae()
    with pytest.raises(ConfigError, match="relaxed Bernoulli"):
        pyro_vae.fit(vae, binary(16), estimator="straight-through", epochs=1, progress=False)


def test_exact_gradient_in_the_columns_of_gradient_samples():
    from pyro_vae.infer.variance import flat_gradient, parameter_groups

    vae, x = make_vae(3, prior="bernoulli-learned"), binary(4)
    flat = flat_gradient(vae, -exact_elbo(vae, x).sum())
    by_name = exact_elbo_gradient(vae, x)
    names = [n for items in parameter_groups(vae).values() for n, _ in items]
    assert torch.allclose(flat, -torch.cat([by_name[n].reshape(-1) for n in names]), atol=1e-6)


def test_prior_latents_are_hard_and_the_gaussian_mixture_is_refused():
    relaxed, x = make_vae(4, relaxed=True), binary(8)
    z = pyro_vae.generation.sample_latents(relaxed, 5)
    assert z.shape == (5, 4) and bool(torch.isinf(z).all())
    exact = make_vae(4, name="exact")
    assert set(pyro_vae.generation.sample_latents(exact, 5).unique().tolist()) <= {0.0, 1.0}
    for vae in (relaxed, exact):
        with pytest.raises(ConfigError, match="Bernoulli latent"):
            pyro_vae.generation.sample(vae, 3, source="mixture", data=x)


def test_a_prior_in_the_other_representation_is_refused():
    with pytest.raises(ConfigError, match="logit space"):
        make_vae(3, relaxed=True, prior=lambda: dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
    with pytest.raises(ConfigError, match="logit space"):
        make_vae(3, relaxed=True, prior=lambda: dist.RelaxedBernoulli(torch.tensor(0.5), logits=torch.zeros(3))
                 .to_event(1))
    with pytest.raises(ConfigError, match="exact Bernoulli"):
        make_vae(3, prior=lambda: LogitRelaxedBernoulli(0.5, logits=torch.zeros(3)).to_event(1))
    make_vae(3, relaxed=True, prior=lambda: LogitRelaxedBernoulli(0.5, logits=torch.zeros(3)).to_event(1))


@pytest.mark.parametrize("estimator", ["pathwise", "straight-through", "score-function"])
def test_vectorized_gradient_samples_equal_the_loop_on_a_relaxed_bernoulli_latent(estimator):
    """The vectorized path draws the relaxed (and the exact logit-space) Bernoulli from uniform noise
    (``from_uniform``) as the loop draws it: with the same seed, the same gradients."""
    from pyro_vae.infer.variance import gradient_samples

    vae, x = make_vae(4, relaxed=True, hidden=(8,)), binary(8)
    pyro.set_rng_seed(0)
    loop = gradient_samples(vae, x, estimator=estimator, num_samples=6, method="loop")
    pyro.set_rng_seed(0)
    vec = gradient_samples(vae, x, estimator=estimator, num_samples=6, method="vectorized")
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()
