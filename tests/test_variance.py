"""Gradient samples: the vectorized sampler reproduces Pyro's own gradients noise by noise, both samplers draw
from the same distribution, and every estimator's mean is the exact ELBO gradient of the linear-Gaussian VAE.

Seeded statistical tests. Mean checks use 4 standard errors per coordinate (false-failure rate about 6e-5 per
coordinate under the normal approximation, about 2.5e-3 per estimator over the 39 parameters); the two-sample
checks use 4.5 standard errors per coordinate and a Kolmogorov-Smirnov p-value above 1e-4."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro import poutine
from torch import nn
from torch.distributions import constraints
from torch.func import functional_call, grad

from pyro_vae import VAE, GaussianEncoder
from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.infer.elbo import make_estimator_elbo
from pyro_vae.infer.estimators import BASELINE_PARAM, EstimatorMessenger, NeuralBaseline, get_estimator
from pyro_vae.infer.variance import (
    METHODS,
    PARAM_GROUP,
    _iter_gradients,
    _plan,
    _Surrogate,
    exact_gradient,
    flat_gradient,
    gradient_samples,
    gradient_statistics,
    parameter_groups,
    summarize,
)
from pyro_vae.models.linear_gaussian import linear_gaussian_vae

ROOT = Path(__file__).resolve().parents[1]
GAUSSIAN = ["pathwise", "score-function", "score-function-baseline", "score-function-neural-baseline"]


def _surrogate(vae, x, est, baseline, num_particles=1, elbo="trace"):
    """The vectorized path's surrogate loss, planned from one run of the traces on ``x``."""
    return _Surrogate(vae, est, num_particles, elbo, baseline, {}, _plan(vae, x, est, num_particles, elbo, {}))


def _setup(batch: int = 4):
    vae = linear_gaussian_vae(data_dim=5, z_dim=2, seed=1)
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(2))
    return vae, x


@pytest.mark.parametrize("estimator", GAUSSIAN)
def test_vectorized_surrogate_equals_pyro_gradient_for_the_same_noise(estimator):
    """Replay the noise of one Pyro ``loss_and_grads`` call through the vectorized surrogate: same gradient."""
    vae, x = _setup()
    est = get_estimator(estimator)
    nn_baseline = NeuralBaseline((5,)) if est.baseline == "neural" else None
    loss_fn = make_estimator_elbo(est, nn_baseline=nn_baseline)
    baseline = {}
    if est.baseline == "decaying":
        baseline = {"z": torch.randn(4)}
        pyro.get_param_store()[BASELINE_PARAM + "z"] = baseline["z"].clone()
    elif est.baseline == "neural":
        baseline = {"z": nn_baseline(x).detach()}
    traced = poutine.trace(vae.guide)
    vae.zero_grad()
    loss_fn.loss_and_grads(vae.model, traced, x)
    names = [n for items in parameter_groups(vae).values() for n, _ in items]
    params = dict(vae.named_parameters())
    pyro_grad = torch.cat([params[n].grad.reshape(-1) for n in names])
    z = traced.trace.nodes["z"]["value"].detach()
    loc, scale = vae.encoder(x)
    eps = ((z - loc) / scale).detach()
    surrogate = _surrogate(vae, x, est, baseline)
    p = {f"vae.{n}": params[n].detach() for n in names}
    g = grad(lambda p_: functional_call(surrogate, p_, ({"z": eps}, x)))(p)
    ours = torch.cat([g[f"vae.{n}"].reshape(-1) for n in names])
    assert torch.allclose(ours, pyro_grad, rtol=1e-4, atol=1e-4), (ours - pyro_grad).abs().max()


@pytest.mark.parametrize("estimator, num_particles, elbo", [
    ("pathwise", 1, "trace"), ("pathwise", 1, "meanfield"), ("pathwise", 10, "trace"),
    ("score-function", 1, "trace"), ("score-function-baseline", 1, "trace"),
    ("score-function-neural-baseline", 1, "trace"), ("score-function", 10, "trace")])
def test_estimator_mean_is_the_exact_elbo_gradient(estimator, num_particles, elbo):
    vae, x = _setup()
    exact = exact_gradient(vae, x)
    stats = gradient_statistics(vae, x, estimator, 4000, num_particles=num_particles, elbo=elbo, exact=exact,
                                seed=0, baseline_warmup=30)
    assert stats["all"]["max_bias_z"] < 4.0, stats["all"]
    assert stats["all"]["dim"] == exact.numel() == 39
    assert set(stats) == {"encoder", "decoder", "all"}


def test_particles_divide_the_variance():
    vae, x = _setup()
    one = gradient_statistics(vae, x, "pathwise", 3000, seed=0)["all"]["total_variance"]
    ten = gradient_statistics(vae, x, "pathwise", 3000, num_particles=10, seed=1)["all"]["total_variance"]
    assert 0.8 < 10 * ten / one < 1.25


def test_score_function_has_more_encoder_variance_and_the_same_decoder_gradient():
    vae, x = _setup()
    pw = gradient_samples(vae, x, "pathwise", 500, groups=True, seed=0)
    sf = gradient_samples(vae, x, "score-function", 500, groups=True, seed=0)
    # same noise, same decoder gradient: the decoder is differentiated pathwise through log p(x | z) either way
    assert torch.allclose(pw["decoder"], sf["decoder"], rtol=1e-4, atol=1e-4)
    assert summarize(sf["encoder"])["mean_variance"] > 10 * summarize(pw["encoder"])["mean_variance"]


@pytest.mark.parametrize("estimator", ["pathwise", pytest.param("score-function-baseline", marks=pytest.mark.slow)])
def test_vectorized_and_loop_draw_from_the_same_distribution(estimator):
    from scipy.stats import ks_2samp

    vae, x = _setup(batch=3)
    n = 200
    loop = gradient_samples(vae, x, estimator, n, method="loop", seed=0, baseline_warmup=50).double()
    vec = gradient_samples(vae, x, estimator, 4 * n, method="vectorized", seed=1, baseline_warmup=50).double()
    se = (loop.var(0) / loop.shape[0] + vec.var(0) / vec.shape[0]).sqrt()
    assert float(((loop.mean(0) - vec.mean(0)).abs() / se).max()) < 4.5
    # total variance: difference within 4.5 standard errors of the two estimates
    def total_and_se(g):
        sq = (g - g.mean(0)).pow(2).sum(1)
        return float(sq.mean()), float(sq.std() / math.sqrt(g.shape[0]))
    (a, sa), (b, sb) = total_and_se(loop), total_and_se(vec)
    assert abs(a - b) < 4.5 * math.hypot(sa, sb), (a, b)
    for j in (0, 5, loop.shape[1] - 1):
        assert ks_2samp(loop[:, j].numpy(), vec[:, j].numpy()).pvalue > 1e-4


def test_shapes_groups_and_param_store_untouched():
    vae, x = _setup()
    before = set(pyro.get_param_store().keys())
    out = gradient_samples(vae, x, "score-function", 7)
    groups = gradient_samples(vae, x, "score-function", 7, groups=True)
    n = sum(p.numel() for p in vae.parameters())
    assert out.shape == (7, n)
    assert list(groups) == ["encoder", "decoder"]
    assert sum(g.shape[1] for g in groups.values()) == n
    assert set(pyro.get_param_store().keys()) == before
    loop = gradient_samples(vae, x, "pathwise", 3, method="loop", groups=True)
    assert {k: v.shape for k, v in loop.items()} == {k: (3, v.shape[1]) for k, v in groups.items()}
    assert all(p.grad is None for p in vae.parameters())


def test_summarize_closed_form():
    samples = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    s = summarize(samples, exact=torch.tensor([2.0, 0.0]))
    assert s["mean_variance"] == pytest.approx(2.0) and s["total_variance"] == pytest.approx(4.0)
    assert s["snr"] == pytest.approx(1.5)  # |3| / 2 on the one coordinate with variance
    assert s["bias"] == pytest.approx(1.0) and s["relative_bias"] == pytest.approx(0.5)
    assert s["max_bias_z"] == pytest.approx(1.0 / (2.0 / math.sqrt(3)))


def test_exact_gradient_matches_flat_gradient_order():
    vae, x = _setup()
    from pyro_vae.models.linear_gaussian import exact_elbo

    assert torch.allclose(exact_gradient(vae, x), flat_gradient(vae, -exact_elbo(vae, x).sum()))


def test_bad_arguments():
    vae, x = _setup()
    with pytest.raises(ConfigError, match="num_samples"):
        gradient_samples(vae, x, "pathwise", 0)
    with pytest.raises(ConfigError, match="method"):
        gradient_samples(vae, x, "pathwise", 2, method="threads")
    with pytest.raises(ConfigError, match="meanfield"):
        gradient_samples(vae, x, "score-function", 2, elbo="meanfield")
    with pytest.raises(ConfigError, match="estimator"):
        gradient_samples(vae, x, "reinforce", 2)


# ------------------------------------------------------------------------------------- categorical latents
def _categorical(straight_through: bool = False):
    import pyro_vae

    vae = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), likelihood="bernoulli",
                       temperature=0.5, straight_through=straight_through)
    x = (torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    return vae, x


def _exact_discrete_elbo(vae, x: torch.Tensor) -> torch.Tensor:
    """sum over the batch of E_q[log p(x, z) - log q(z | x)] by enumerating all K^N one-hot latents."""
    import itertools

    n, k = 2, 3
    configs = torch.stack([torch.eye(k)[list(c)] for c in itertools.product(range(k), repeat=n)])  # (K^N, n, k)
    log_q = (configs[:, None] * vae.encoder(x)[None]).sum((-1, -2))  # (K^N, batch), normalized logits
    prior_logits = torch.log_softmax(vae.prior().base_dist.logits, -1)
    log_pz = (configs * prior_logits).sum((-1, -2))[:, None]
    out = vae.decoder(vae.decoder_input(configs.log()))[:, None].expand(-1, x.shape[0], -1)  # log-space latents
    log_px = torch.distributions.Bernoulli(logits=out).log_prob(x).sum(-1)
    return (log_q.exp() * (log_px + log_pz - log_q)).sum()


@pytest.mark.parametrize("estimator", ["score-function",
                                       pytest.param("score-function-baseline", marks=pytest.mark.slow)])
def test_categorical_score_function_mean_is_the_exact_discrete_gradient(estimator):
    """Score function on the exact OneHotCategorical (model and guide): unbiased for the discrete ELBO, whose
    gradient we get by enumerating the 9 latent configurations."""
    vae, x = _categorical()
    exact = flat_gradient(vae, -_exact_discrete_elbo(vae, x))
    stats = gradient_statistics(vae, x, estimator, 4000, exact=exact, seed=0, baseline_warmup=30)
    assert stats["all"]["max_bias_z"] < 4.0, stats["all"]


@pytest.mark.parametrize("estimator", ["relaxed", "straight-through", "score-function"])
def test_categorical_vectorized_equals_pyro_for_the_same_noise(estimator):
    vae, x = _categorical()
    est = get_estimator(estimator)
    traced = poutine.trace(vae.guide)
    vae.zero_grad()
    pyro.set_rng_seed(5)
    make_estimator_elbo(est).loss_and_grads(vae.model, traced, x)
    names = [n for items in parameter_groups(vae).values() for n, _ in items]
    params = dict(vae.named_parameters())
    pyro_grad = torch.cat([params[n].grad.reshape(-1) for n in names])
    # the same Gumbel noise: replay the seeded draw
    pyro.set_rng_seed(5)
    u = torch.rand(3, 2, 3).clamp(torch.finfo(torch.float32).tiny, 1.0)
    eps = -torch.log(-torch.log(u))
    z = traced.trace.nodes["z"]["value"].detach()
    if estimator == "score-function":  # the exact categorical is drawn by multinomial: noise that picks z
        assert bool(((z == 0) | (z == -math.inf)).all())  # the log of a one-hot
        eps = 1e3 * z.exp()
    surrogate = _surrogate(vae, x, est, {})
    g = grad(lambda p_: functional_call(surrogate, p_, ({"z": eps}, x)))(
        {f"vae.{n}": params[n].detach() for n in names})
    ours = torch.cat([g[f"vae.{n}"].reshape(-1) for n in names])
    assert torch.allclose(ours, pyro_grad, rtol=1e-4, atol=1e-4), (ours - pyro_grad).abs().max()


def test_straight_through_and_relaxed_differ_only_in_what_the_decoder_sees():
    """The estimator, not the VAE's own setting, decides during its steps: the same log-space draw, the same
    densities; the decoder sees exp(z) under "relaxed" and its hard one-hot under "straight-through"."""
    seen = []
    for vae_st in (False, True):
        vae, x = _categorical(straight_through=vae_st)
        hook = vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        guide_tr = poutine.trace(vae.guide).get_trace(x)
        z = guide_tr.nodes["z"]["value"]
        for estimator in ("relaxed", "straight-through"):
            model = EstimatorMessenger(estimator, "model")(vae.model)
            tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
            assert tr.nodes["z"]["value"] is z
            assert torch.equal(tr.nodes["z"]["fn"].log_prob(z), vae.prior().log_prob(z))
            inp = seen.pop().reshape(z.shape)
            if estimator == "relaxed":
                assert torch.allclose(inp, z.exp())
            else:
                assert torch.equal(inp, torch.nn.functional.one_hot(z.argmax(-1), 3).float())
        poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)  # no estimator: the VAE's own
        inp = seen.pop().reshape(z.shape)
        assert bool(((inp == 0) | (inp == 1)).all()) == vae_st
        hook.remove()
        pyro.clear_param_store()


# ----------------------------------------------------------------------------------------------- benchmarks
def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gradient_variance_benchmark_smoke(tmp_path):
    import json

    out = _run("gradient_variance.py", "--quick", "--device", "cpu", "--models", "linear-gaussian",
               "--particles", "1", "--num-samples", "50", "--loop-samples", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gradient_variance.json").read_text())
    assert (tmp_path / "gradient_variance.png").stat().st_size > 0
    cells = {(r["checkpoint"], r["estimator"], r["group"]) for r in report["records"]}
    assert ("trained", "score-function-baseline", "encoder") in cells and ("untrained", "pathwise", "all") in cells
    for r in report["records"]:
        assert r["device"] and r["torch"] == torch.__version__ and r["pyro"] == pyro.__version__ and r["date"]
        assert r["bias"] is not None and r["loop_seconds_per_1000"] > 0
    assert "score-function" in out and "device:" in out


@pytest.mark.slow
def test_full_quick_benchmarks(tmp_path):
    import json

    _run("gradient_variance.py", "--quick", "--device", "cpu", "--out", str(tmp_path))
    models = {r["model"] for r in json.loads((tmp_path / "gradient_variance.json").read_text())["records"]}
    assert {"linear-gaussian", "digits-mlp", "categorical", "digits-sbn"} <= models
    _run("estimator_training.py", "--quick", "--seconds", "0.5", "--device", "cpu", "--out", str(tmp_path))
    results = json.loads((tmp_path / "estimator_training.json").read_text())["results"]
    assert {r["estimator"] for r in results} >= {"pathwise", "score-function", "straight-through"}
    assert (tmp_path / "estimator_training.png").stat().st_size > 0


# ------------------------------------------------------------------ pyro.param entries of the parts (point 6)
class _OffsetEncoder(GaussianEncoder):
    """The linear encoder's Gaussian, its mean shifted by a learnable ``pyro.param``."""

    def distribution(self, x):
        loc, scale = self(x)
        return dist.Normal(loc + pyro.param("guide_offset", torch.zeros(self.z_dim)), scale).to_event(1)


def _learnable_prior():
    return dist.Normal(pyro.param("prior_loc", torch.zeros(2)),
                       pyro.param("prior_scale", torch.ones(2), constraint=constraints.positive)).to_event(1)


def _with_params(train_steps: int = 20):
    """A linear-Gaussian VAE whose guide and prior hold ``pyro.param`` entries (one of them constrained),
    trained a few SVI steps so that the store's values are no longer the initial ones."""
    from pyro_vae.likelihoods import Normal

    pyro.clear_param_store()
    torch.manual_seed(3)
    vae = VAE((5,), 2, encoder=_OffsetEncoder(nn.Linear(5, 4), 2), decoder=nn.Linear(2, 5),
              prior=_learnable_prior, likelihood=Normal(scale=0.5))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2)) + 1.0
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    for _ in range(train_steps):
        svi.step(x)
    store = pyro.get_param_store()
    if train_steps:
        moved = [(store["prior_scale"] - 1), store["prior_loc"], store["guide_offset"]]  # from their initial values
        assert all(float(d.detach().abs().max()) > 0.1 for d in moved)
    return vae, x


def _closed_form_elbo(vae, x):
    """sum over the batch of the ELBO of ``_with_params``' VAE, in closed form (a linear-Gaussian model with the
    prior N(prior_loc, prior_scale^2) and the guide N(Ax + c + offset, s^2)), differentiable in every parameter."""
    w, b, s = vae.decoder.weight, vae.decoder.bias, float(vae.likelihood.scale)
    loc, scale = vae.encoder(x)
    m, v = loc + pyro.param("guide_offset"), scale.pow(2)
    mu, sp = pyro.param("prior_loc"), pyro.param("prior_scale")
    resid = (x - m @ w.T - b).pow(2).sum(-1) + (v * w.pow(2).sum(0)).sum(-1)
    loglik = -0.5 * x.shape[-1] * math.log(2 * math.pi * s**2) - resid / (2 * s**2)
    kl = (sp.log() - 0.5 * v.log() + (v + (m - mu).pow(2)) / (2 * sp.pow(2)) - 0.5).sum(-1)
    return (loglik - kl).sum()


def _same_noise(vae, x, estimator, n, method, elbo="trace", num_particles=1, noise=None, **kwargs):
    """Gradient samples for given noise ``(n, [num_particles,] batch, ...)`` per latent site, seeded so that
    baselines warm up identically."""
    pyro.set_rng_seed(0)
    _, chunks = _iter_gradients(vae, x, estimator, n, num_particles, method, elbo, None, 20, None, kwargs,
                                noise=noise)
    return torch.cat(list(chunks))


def test_pyro_params_are_columns_at_their_current_values():
    vae, x = _with_params()
    groups = parameter_groups(vae, x)
    store = pyro.get_param_store()
    assert [n for n, _ in groups[PARAM_GROUP]] == ["guide_offset", "prior_loc", "prior_scale"]
    assert all(t is store._params[n] for n, t in groups[PARAM_GROUP])  # the unconstrained leaves SVI updates
    exact = flat_gradient(vae, -_closed_form_elbo(vae, x), x)
    stats = gradient_statistics(vae, x, "pathwise", 4000, exact=exact, seed=0)
    assert stats[PARAM_GROUP]["dim"] == 6 and stats["all"]["dim"] == exact.numel() == 6 + 39
    # 4 standard errors per coordinate: false-failure rate about 6e-5 per coordinate, 3e-3 over the 45
    assert stats["all"]["max_bias_z"] < 4.0, stats["all"]
    loop = gradient_statistics(vae, x, "pathwise", 300, method="loop", exact=exact, seed=1)
    assert loop["all"]["max_bias_z"] < 4.0, loop["all"]


@pytest.mark.parametrize("estimator, elbo, num_particles", [
    ("pathwise", "trace", 1), ("pathwise", "meanfield", 1), ("pathwise", "trace", 3), ("pathwise", "meanfield", 3),
    ("score-function", "trace", 1), ("score-function", "trace", 3), ("score-function-baseline", "trace", 1),
    ("score-function-neural-baseline", "trace", 1), ("score-function-neural-baseline", "trace", 3)])
def test_vectorized_equals_loop_for_the_same_noise(estimator, elbo, num_particles):
    """Every estimator: the vectorized gradient of each noise draw is Pyro's own ``loss_and_grads`` gradient for
    that draw, on every column, the pyro.param entries included."""
    vae, x = _with_params(train_steps=5)
    shape = (6, num_particles, 4, 2) if num_particles > 1 else (6, 4, 2)
    noise = {"z": torch.randn(shape, generator=torch.Generator().manual_seed(7))}
    loop = _same_noise(vae, x, estimator, 6, "loop", elbo, num_particles, noise)
    vec = _same_noise(vae, x, estimator, 6, "vectorized", elbo, num_particles, noise)
    assert loop.shape == vec.shape == (6, 45)
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(loc=st.lists(st.floats(-3, 3), min_size=2, max_size=2), log_scale=st.lists(st.floats(-2, 2), min_size=2,
                                                                                     max_size=2),
       offset=st.lists(st.floats(-3, 3), min_size=2, max_size=2))
def test_vectorized_equals_loop_at_any_param_store_values(loc, log_scale, offset):
    """Whatever values the param store holds, both methods differentiate at those values."""
    vae, x = _with_params(train_steps=0)
    store = pyro.get_param_store()
    store["prior_loc"], store["guide_offset"] = torch.tensor(loc), torch.tensor(offset)
    store["prior_scale"] = torch.tensor(log_scale).exp()
    noise = {"z": torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(1))}
    loop = _same_noise(vae, x, "pathwise", 3, "loop", noise=noise)
    vec = _same_noise(vae, x, "pathwise", 3, "vectorized", noise=noise)
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()


def test_module_outside_the_vae_refused_by_vectorized_and_covered_by_loop():
    """A part that registers a module the VAE does not hold (``pyro.module``): the loop differentiates its
    parameters under their param-store names; the vectorized path cannot put functional tensors into it and
    says so instead of returning a gradient at a stale value."""
    net = nn.Linear(1, 2)

    def prior():
        pyro.module("shift", net)
        return dist.Normal(net(torch.ones(1)), 1.0).to_event(1)

    from pyro_vae.likelihoods import Normal

    vae = VAE((5,), 2, encoder=nn.Linear(5, 4), decoder=nn.Linear(2, 5), prior=prior, likelihood=Normal(scale=0.5))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ConfigError, match=r'"shift\$\$\$weight".*method="loop"'):
        gradient_samples(vae, x, "pathwise", 2)
    loop = gradient_samples(vae, x, "pathwise", 400, method="loop", groups=True, seed=0)
    names = [n for n, _ in parameter_groups(vae, x)[PARAM_GROUP]]
    assert names == ["shift$$$weight", "shift$$$bias"] and loop[PARAM_GROUP].shape == (400, 4)
    # d(-ELBO)/d(prior mean) = -sum_i (E_q[z_i] - mean): the bias column's mean, within 4.5 standard errors
    with torch.no_grad():
        expected = -(vae.encoder(x)[0] - net(torch.ones(1))).sum(0)
    g = loop[PARAM_GROUP][:, 2:].double()
    assert bool(((g.mean(0) - expected).abs() <= 4.5 * g.std(0) / 20 + 1e-6).all()), (g.mean(0), expected)


# --------------------------------------------------------------- TraceMeanField_ELBO without a KL (point 9)
def _prior_vae(prior: str):
    pyro.clear_param_store()
    torch.manual_seed(0)
    if prior == "categorical":
        vae = VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5)
        shape = (2, 3)
    else:
        vae = VAE((6,), 2, prior=prior, hidden=(8,))
        shape = (2,)
    x = (torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    return vae, x, shape


@pytest.mark.parametrize("prior", ["mixture", "vamp", "student-t", "flow", "categorical", "normal", "laplace"])
def test_meanfield_vectorized_equals_loop_and_names_the_monte_carlo_sites(prior):
    """``TraceMeanField_ELBO`` uses the registered KL where there is one and the Monte Carlo estimate elsewhere:
    the vectorized path does the same (gradients equal to the loop's for the same noise), warns naming the
    sites without a closed form, and ``gradient_statistics`` reports both lists."""
    vae, x, shape = _prior_vae(prior)
    analytic = prior in ("normal", "laplace")
    noise = {"z": torch.randn(5, 3, *shape, generator=torch.Generator().manual_seed(1))}
    if prior == "categorical":  # Gumbel noise
        noise["z"] = -torch.log(-torch.log(torch.rand(5, 3, *shape, generator=torch.Generator().manual_seed(1))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = _same_noise(vae, x, "pathwise", 5, "loop", "meanfield", noise=noise)
        vec = _same_noise(vae, x, "pathwise", 5, "vectorized", "meanfield", noise=noise)
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()
    fallbacks = [w for w in caught if "no closed-form KL" in str(w.message)]
    if analytic:
        assert not fallbacks
    else:
        assert len(fallbacks) == 2 and all('"z"' in str(w.message) for w in fallbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = gradient_statistics(vae, x, "pathwise", 4, elbo="meanfield", seed=0)
        trace = gradient_statistics(vae, x, "pathwise", 4, elbo="trace", seed=0)
    assert stats["all"]["analytic_kl_sites"] == (["z"] if analytic else [])
    assert stats["all"]["monte_carlo_kl_sites"] == ([] if analytic else ["z"])
    assert trace["all"]["analytic_kl_sites"] == [] and trace["all"]["monte_carlo_kl_sites"] == ["z"]


# ------------------------------------------------------------- TraceGraph_ELBO's cost terms (baselines)
class _Penalized(nn.Module):
    """A local-latent model with a regularizer ``pyro.factor`` that does not depend on the latent:
    ``TraceGraph_ELBO`` leaves it out of the latent's score-function cost, ``Trace_ELBO`` keeps it in."""

    data_shape = (3,)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.enc = nn.Linear(3, 2)

    def model(self, x):
        pyro.module("m", self)
        pyro.factor("penalty", -5.0 * self.w.pow(2).sum())
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z[:, None] * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("m", self)
        loc, raw = self.enc(x).unbind(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1))


@pytest.mark.parametrize("estimator", ["score-function-baseline", "score-function-neural-baseline",
                                       "score-function"])
def test_vectorized_uses_the_cost_terms_of_the_loops_elbo(estimator):
    model = _Penalized()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    noise = {"z": torch.randn(6, 4, generator=torch.Generator().manual_seed(1))}
    loop = _same_noise(model, x, estimator, 6, "loop", noise=noise)
    vec = _same_noise(model, x, estimator, 6, "vectorized", noise=noise)
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()


def test_pyro_module_part_with_constrained_params():
    """A ``PyroModule`` prior (its ``PyroParam`` entries, one constrained, are parameters of the VAE): both
    methods differentiate at the current values, for the same noise."""
    from pyro.nn import PyroModule, PyroParam

    class Prior(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(2))
            self.scale = PyroParam(torch.ones(2), constraint=constraints.positive)

        def forward(self):
            return dist.Normal(self.loc, self.scale).to_event(1)

    torch.manual_seed(0)
    vae = VAE((6,), 2, prior=Prior(), hidden=(8,))
    x = (torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    with torch.no_grad():
        assert float((vae.prior.scale - 1).abs().max()) > 0.1
    groups = parameter_groups(vae, x)
    assert [n for n, _ in groups["prior"]] == ["prior.loc_unconstrained", "prior.scale_unconstrained"]
    assert PARAM_GROUP not in groups
    noise = {"z": torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))}
    loop = _same_noise(vae, x, "pathwise", 4, "loop", noise=noise)
    vec = _same_noise(vae, x, "pathwise", 4, "vectorized", noise=noise)
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()


@pytest.mark.parametrize("estimator, elbo, num_particles", [
    ("relaxed", "trace", 1), ("relaxed", "meanfield", 1), ("relaxed", "trace", 2), ("straight-through", "trace", 1),
    ("score-function", "trace", 1), ("score-function-baseline", "trace", 1), ("pathwise", "trace", 2)])
def test_categorical_vectorized_equals_loop_for_the_same_noise(estimator, elbo, num_particles):
    """Every categorical estimator, with a learnable prior: the same Gumbel noise gives the same gradient."""
    vae = VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5, prior="categorical-learned")
    x = (torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    shape = (5, num_particles, 3, 2, 3) if num_particles > 1 else (5, 3, 2, 3)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    noise = {"z": -torch.log(-torch.log(u))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Monte Carlo KL of the mean-field case
        loop = _same_noise(vae, x, estimator, 5, "loop", elbo, num_particles, noise)
        vec = _same_noise(vae, x, estimator, 5, "vectorized", elbo, num_particles, noise)
    assert torch.isfinite(loop).all() and loop.abs().sum() > 0
    assert torch.allclose(vec, loop, rtol=1e-4, atol=1e-4), (vec - loop).abs().max()


def test_param_statements_that_change_between_draws_are_refused_by_both_methods():
    calls = [0]

    def prior():
        calls[0] += 1
        loc = pyro.param("late", torch.zeros(2)) if calls[0] > 3 else torch.zeros(2)
        return dist.Normal(loc, 1.0).to_event(1)

    for method in METHODS:
        pyro.clear_param_store()
        calls[0] = 0
        vae = VAE((6,), 2, prior=prior, hidden=(8,))
        x = torch.ones(3, 6)
        with pytest.raises(ConfigError, match='"late".*change structure between draws'):
            gradient_samples(vae, x, "pathwise", 4, method=method, chunk_size=1)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_non_finite_gradient_samples_raise_naming_the_parameters():
    vae, x = _with_params(train_steps=0)
    pyro.get_param_store()["prior_loc"] = torch.tensor([0.0, math.nan])
    for method in METHODS:
        with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError, match="pyro.param prior_loc"):
            gradient_samples(vae, x, "pathwise", 3, method=method)


def test_noise_in_the_latents_dtype_whatever_the_datas():
    """float64 data for a float32 VAE: the vectorized path draws the noise as the guide's distribution does, in
    the latent's dtype, so the data's dtype changes neither the draws nor the gradients."""
    vae, x = _with_params(train_steps=0)
    for method in METHODS:
        g32 = gradient_samples(vae, x, "pathwise", 3, method=method, seed=0)
        g64 = gradient_samples(vae, x.double(), "pathwise", 3, method=method, seed=0)
        assert g64.dtype == torch.float32 and torch.allclose(g32, g64, rtol=1e-5, atol=1e-5), method


def test_exact_gradient_of_the_wrong_size_is_refused():
    vae, x = _with_params(train_steps=0)
    module_only = flat_gradient(vae, -_closed_form_elbo(vae, x))  # without x: the VAE's module parameters only
    assert module_only.numel() == 39
    with pytest.raises(ConfigError, match=r"exact: expected 45 numbers.*pyro\.param"):
        gradient_statistics(vae, x, "pathwise", 2, exact=module_only)


def test_max_bias_z_of_an_estimator_exact_but_for_rounding_is_of_order_one():
    """score-function-delta-cv is exact on the linear-Gaussian VAE's encoder (its cost is quadratic in z): the
    encoder's samples agree to float32 rounding, which does not average out, so the z-score must not grow with
    the sample count. Deterministic (seeded)."""
    vae = linear_gaussian_vae(5, 2, seed=3)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    exact = exact_gradient(vae, x) * 5  # num_data = 40 scales the batch's gradient by 40 / 8
    s = gradient_statistics(vae, x, "score-function-delta-cv", 300, exact=exact, seed=1, num_data=40)
    assert s["encoder"]["relative_bias"] < 1e-6 and s["encoder"]["max_bias_z"] < 1.0, s["encoder"]
    assert s["decoder"]["max_bias_z"] < 4.0, s["decoder"]


def test_max_bias_z_still_sees_a_bias_in_noise_above_rounding():
    """The rounding allowance applies to spreads within 256 eps of the samples' size only: float32 samples whose
    spread is 1e-4 of their size (about 840 eps, Monte Carlo noise) keep the standard error of the mean, and a
    bias of 10 standard errors reads as z of about 10 (the same as in float64). Deterministic (seeded)."""
    torch.manual_seed(0)
    n, noise = 10000, 1e-4
    exact = torch.ones(3)
    samples = (exact + 10 * noise / n ** 0.5 + noise * torch.randn(n, 3, dtype=torch.float64)).float()
    z32 = summarize(samples, exact)["max_bias_z"]
    z64 = summarize(samples.double(), exact.double())["max_bias_z"]
    assert z32 == pytest.approx(z64) and z32 > 8
