"""Gradient samples: the vectorized sampler reproduces Pyro's own gradients noise by noise, both samplers draw
from the same distribution, and every estimator's mean is the exact ELBO gradient of the linear-Gaussian VAE.

Seeded statistical tests. Mean checks use 4 standard errors per coordinate (false-failure rate about 6e-5 per
coordinate under the normal approximation, about 2.5e-3 per estimator over the 39 parameters); the two-sample
checks use 4.5 standard errors per coordinate and a Kolmogorov-Smirnov p-value above 1e-4."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from torch.func import functional_call, grad

from pyro_vae.errors import ConfigError
from pyro_vae.estimators import BASELINE_PARAM, EstimatorMessenger, NeuralBaseline, get_estimator, make_estimator_elbo
from pyro_vae.linear_gaussian import linear_gaussian_vae
from pyro_vae.variance import (_Surrogate, exact_gradient, flat_gradient, gradient_samples, gradient_statistics,
                               parameter_groups, summarize)

ROOT = Path(__file__).resolve().parents[1]
GAUSSIAN = ["pathwise", "score-function", "score-function-baseline", "score-function-neural-baseline"]


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
    surrogate = _Surrogate(vae, est, 1, "trace", baseline, {})
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
    from pyro_vae.linear_gaussian import exact_elbo

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
    out = vae.decoder(vae._decoder_input(configs))[:, None].expand(-1, x.shape[0], -1)
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
    if estimator == "score-function":  # torch draws OneHotCategorical by multinomial: noise that picks z
        assert bool(((z == 0) | (z == 1)).all())
        eps = 1e3 * z
    surrogate = _Surrogate(vae, est, 1, "trace", {}, {})
    g = grad(lambda p_: functional_call(surrogate, p_, ({"z": eps}, x)))(
        {f"vae.{n}": params[n].detach() for n in names})
    ours = torch.cat([g[f"vae.{n}"].reshape(-1) for n in names])
    assert torch.allclose(ours, pyro_grad, rtol=1e-4, atol=1e-4), (ours - pyro_grad).abs().max()


def test_straight_through_and_relaxed_differ_only_in_the_sample():
    vae, x = _categorical(straight_through=True)
    tr = poutine.trace(EstimatorMessenger("relaxed", "guide")(vae.guide)).get_trace(x)
    z = tr.nodes["z"]["value"]
    assert not bool(((z == 0) | (z == 1)).all())
    pyro.clear_param_store()
    tr = poutine.trace(EstimatorMessenger("straight-through", "guide")(_categorical()[0].guide)).get_trace(x)
    z = tr.nodes["z"]["value"]
    assert bool(((z == 0) | (z == 1)).all()) and z.requires_grad


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
    assert {"linear-gaussian", "digits-mlp", "categorical"} <= models
    _run("estimator_training.py", "--quick", "--seconds", "0.5", "--device", "cpu", "--out", str(tmp_path))
    results = json.loads((tmp_path / "estimator_training.json").read_text())["results"]
    assert {r["estimator"] for r in results} >= {"pathwise", "score-function", "straight-through"}
    assert (tmp_path / "estimator_training.png").stat().st_size > 0
