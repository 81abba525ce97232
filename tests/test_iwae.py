"""The importance-weighted bound (IWAE, Renyi-alpha) as a training objective: its value against the
linear-Gaussian VAE's closed forms and against a hand computation from the traces, its pathwise and DReG
gradients against hand-written PyTorch for the same noise, and its use by SVI, fit (checkpoints, resume, the
History's names) and the error messages.

Seeded statistical tests compare means within 4 standard errors (false-failure rate about 6e-5 per comparison
under the normal approximation; 7 comparisons here)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import evaluate_elbo, make_elbo
from pyro_vae.infer.estimators import score_function
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.models.linear_gaussian import exact_elbo, exact_log_likelihood, linear_gaussian_vae, set_exact_guide


def _setup(batch: int = 4):
    vae = linear_gaussian_vae(data_dim=5, z_dim=2, seed=1)
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(2))
    return vae, x


def _bound_estimates(vae, x0, k, copies=500, calls=20):
    """``calls`` means of ``copies`` independent one-draw estimates of the bound at the point ``x0``."""
    loss_fn = make_elbo("iwae", k)
    x = x0.expand(copies, -1)
    return torch.tensor([-loss_fn.loss(vae.model, vae.guide, x) / copies for _ in range(calls)], dtype=torch.float64)


def test_one_sample_is_trace_elbo():
    vae, x = _setup()
    pyro.set_rng_seed(3)
    ours = make_elbo("iwae", 1).loss(vae.model, vae.guide, x, num_data=40)
    pyro.set_rng_seed(3)
    pyros = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, num_data=40)
    assert ours == pytest.approx(pyros, rel=1e-6)


def test_bound_lies_between_the_elbo_and_log_px_and_grows_with_k():
    vae, x = _setup(1)
    elbo, log_px = float(exact_elbo(vae, x).detach()), float(exact_log_likelihood(vae, x).detach())
    means, ses = [], []
    for k in (1, 4, 16):
        est = _bound_estimates(vae, x[0], k)
        means.append(float(est.mean()))
        ses.append(float(est.std() / math.sqrt(len(est))))
    assert abs(means[0] - elbo) < 4 * ses[0], (means[0], elbo)
    for (m1, s1), (m2, s2) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert m2 - m1 > 4 * math.hypot(s1, s2), means
    assert elbo < means[-1] < log_px + 4 * ses[-1], (elbo, means, log_px)


def test_bound_is_log_px_at_the_exact_posterior_for_every_draw():
    """All weights equal p(x): one draw of the bound is log p(x) (to float precision), scaled to num_data."""
    vae, x = _setup()
    set_exact_guide(vae)
    exact = float(exact_log_likelihood(vae, x).sum().detach())
    for k in (1, 7):
        loss = make_elbo("iwae", k).loss(vae.model, vae.guide, x, num_data=40)
        assert -loss == pytest.approx(10 * exact, rel=1e-5)


def _two_site_model(x, num_data=None):
    """Two latent sites inside the data plate, one of them inside a nested plate; per-pixel likelihood."""
    data = pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0]), dim=-2)
    with data:
        a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
        with pyro.plate("pixels", x.shape[-1], dim=-1):
            b = pyro.sample("b", dist.Normal(a[..., 0], 1.0))
            pyro.sample("x", dist.Normal(b + a[..., 1], 0.5), obs=x)


def _two_site_guide(x, num_data=None):
    loc = pyro.param("loc", torch.tensor([0.3, -0.2]))
    data = pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0]), dim=-2)
    with data:
        pyro.sample("a", dist.Normal(loc, 0.8).expand([x.shape[0], 1, 2]).to_event(1))
        with pyro.plate("pixels", x.shape[-1], dim=-1):
            pyro.sample("b", dist.Normal(0.5 * x, 0.7))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_several_latent_sites_and_a_nested_plate_match_a_hand_computation(alpha):
    """log w per particle and data point summed over the nested plate, log-mean-exp over K per data point, summed
    over the points and scaled by num_data / batch; Renyi's order alpha as 1/(1-alpha) log mean w^(1-alpha)."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    k = 5
    loss_fn = ImportanceWeightedELBO(k, alpha=alpha, max_plate_nesting=2)
    traced = pyro.poutine.trace(_two_site_guide)
    loss = loss_fn.loss(_two_site_model, traced, x, num_data=12)
    a = traced.trace.nodes["a"]["value"]  # (K, 3, 1, 2)
    b = traced.trace.nodes["b"]["value"]  # (K, 3, 4)
    assert a.shape == (k, 3, 1, 2) and b.shape == (k, 3, 4)
    loc = pyro.param("loc").detach()
    log_p = (dist.Normal(0.0, 1.0).log_prob(a).sum(-1).squeeze(-1) + dist.Normal(a[..., 0], 1.0).log_prob(b).sum(-1)
             + dist.Normal(b + a[..., 1], 0.5).log_prob(x).sum(-1))
    log_q = dist.Normal(loc, 0.8).log_prob(a).sum(-1).squeeze(-1) + dist.Normal(0.5 * x, 0.7).log_prob(b).sum(-1)
    log_w = (log_p - log_q).double()  # (K, 3)
    per_point = (torch.logsumexp((1 - alpha) * log_w, 0) - math.log(k)) / (1 - alpha)
    assert -loss == pytest.approx(float(4 * per_point.sum()), rel=1e-5)


def test_a_global_latent_is_refused_naming_the_site():
    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ConfigError, match='site "g".*inside the data plate "data"'):
        make_elbo("iwae", 3).loss(model, guide, torch.randn(4))


def test_a_score_function_guide_site_is_refused_naming_the_site():
    vae, x = _setup()
    with pytest.raises(ConfigError, match='guide site "z".*score-function'):
        make_elbo("iwae", 3).loss(vae.model, score_function(vae.guide), x)


def _hand_written(vae, x, eps, dreg):
    """The IWAE (or DReG) gradient in plain PyTorch, the way google-research's dreg_estimators writes it: the
    decoder gets the bound's gradient; with DReG the encoder gets sum_k w~_k^2 grad(log p - log q_stop)."""
    w_dec, b_dec, s = vae.decoder.weight, vae.decoder.bias, float(vae.likelihood.scale)
    loc, scale = vae.encoder(x)
    z = loc + scale * eps  # (K, batch, z_dim)
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_px = dist.Normal(z @ w_dec.T + b_dec, s).log_prob(x).sum(-1)
    log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
    log_w = log_pz + log_px - log_q
    bound = (torch.logsumexp(log_w, 0) - math.log(eps.shape[0])).sum()
    enc = list(vae.encoder.parameters())
    dec = list(vae.decoder.parameters())
    g_dec = torch.autograd.grad(bound, dec, retain_graph=True)
    if not dreg:
        g_enc = torch.autograd.grad(bound, enc)
    else:
        w = torch.softmax(log_w.detach(), 0)
        log_q_stop = dist.Normal(loc.detach(), scale.detach()).log_prob(z).sum(-1)
        g_enc = torch.autograd.grad((w.pow(2) * (log_pz + log_px - log_q_stop)).sum(), enc)
    return torch.cat([g.reshape(-1) for g in (*g_enc, *g_dec)])


@pytest.mark.parametrize("estimator", ["pathwise", "dreg"])
def test_gradient_equals_hand_written_pytorch_for_the_same_noise(estimator):
    vae, x = _setup()
    k = 6
    traced = pyro.poutine.trace(vae.guide)
    vae.zero_grad()
    make_elbo("iwae", k, estimator).loss_and_grads(vae.model, traced, x)
    ours = torch.cat([p.grad.reshape(-1) for p in (*vae.encoder.parameters(), *vae.decoder.parameters())])
    z = traced.trace.nodes["z"]["value"].detach()
    loc, scale = vae.encoder(x)
    eps = ((z - loc) / scale).detach()
    theirs = -_hand_written(vae, x, eps, estimator == "dreg")  # the loss is the negative bound
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()


def test_plain_svi_trains_with_the_bound():
    vae, x = _setup(16)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("iwae", 8, "dreg"))
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    losses = [svi.step(x) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(before[n], p) for n, p in vae.named_parameters())
    assert sum(losses[-5:]) < sum(losses[:5])


def test_evaluate_elbo_refuses_the_bound():
    vae, x = _setup()
    for elbo in ("iwae", make_elbo("iwae", 3)):
        with pytest.raises(ConfigError, match="importance-weighted bound"):
            evaluate_elbo(vae, x, elbo=elbo)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="alpha"):
        make_elbo("iwae", 3, alpha=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        make_elbo("trace", 3, alpha=0.5)
    with pytest.raises(ConfigError, match="num_particles"):
        make_elbo("iwae", 0)
    with pytest.raises(ConfigError, match='estimator "stl"'):
        ImportanceWeightedELBO(3, estimator="stl")


def _vae():
    pyro.clear_param_store()
    return linear_gaussian_vae(seed=1)


def _fit(vae, x, **kw):
    args = dict(elbo="iwae", num_particles=5, epochs=2, batch_size=16, lr=1e-2, progress=False, device="cpu",
                seed=0)
    return pyro_vae.fit(vae, x, **{**args, **kw})


@pytest.mark.parametrize("estimator", ["pathwise", "dreg"])
def test_fit_trains_checkpoints_and_resumes_bit_for_bit(tmp_path, estimator):
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    plain = _vae()
    whole = _fit(plain, x, epochs=3, checkpoint_every=2, estimator=estimator)
    first = _vae()
    _fit(first, x, checkpoint_dir=tmp_path, checkpoint_every=2, estimator=estimator)
    resumed = _vae()
    hist = _fit(resumed, x, epochs=3, checkpoint_dir=tmp_path, resume_from=tmp_path, checkpoint_every=2,
                estimator=estimator)
    for key, value in plain.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert [e["train_objective"] for e in hist.epochs] == [e["train_objective"] for e in whole.epochs]
    assert [e["train_elbo"] for e in hist.epochs] == [e["train_elbo"] for e in whole.epochs]


def test_fit_history_keeps_the_elbo_apart_from_the_bound():
    """train_objective is the bound, train_elbo and val_elbo the ELBO: at a learning rate too small to move the
    parameters, train_elbo is the exact ELBO within 4 standard errors and the bound lies above it."""
    vae = linear_gaussian_vae(seed=1)
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    hist = _fit(vae, x, epochs=1, batch_size=100, lr=1e-12, num_particles=20, val_data=x)
    rec = hist.epochs[0]
    exact = float(exact_elbo(vae, x).mean().detach())
    per_point = torch.tensor([-Trace_ELBO().loss(vae.model, vae.guide, x[i: i + 1]) for i in range(200)])
    se = float(per_point.std()) / math.sqrt(len(x))
    assert abs(rec["train_elbo"] - exact) < 4 * se, (rec, exact, se)
    assert abs(rec["val_elbo"] - exact) < 4 * se, (rec, exact, se)
    assert rec["train_objective"] > rec["train_elbo"] + 4 * se


def test_cli_trains_the_bound_and_refuses_mixed_flags(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    base = ["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--no-progress",
            "--device", "cpu", "--batch-size", "256"]
    assert main([*base, "--objective", "iwae", "--k", "4", "--estimator", "dreg", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert (config["objective"], config["k"], config["elbo"]) == ("iwae", 4, "trace")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "IWAE bound with 4 importance samples" in metrics["how"]["train_objective"]["estimate"]
    assert metrics["how"]["test_elbo"]["estimate"].startswith("Trace_ELBO")
    for extra, flag in ((["--objective", "iwae", "--elbo", "trace"], "--elbo"),
                        (["--objective", "iwae", "--particles", "3"], "--particles"),
                        (["--k", "5"], "--k"), (["--estimator", "dreg"], "--estimator dreg")):
        assert main([*base, *extra, "--out", str(tmp_path / "b")]) == 2
        assert f"error: {flag}" in capsys.readouterr().err
