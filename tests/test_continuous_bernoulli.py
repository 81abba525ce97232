"""The continuous Bernoulli likelihood is an exact density for every real logit, in float32 and float64.

References: the density integrated numerically (scipy's adaptive quadrature), and the closed forms
log p(x | eta) = x eta + log(eta / expm1(eta)), E[x] = 1 / (1 - exp(-eta)) - 1 / eta,
Var[x] = 1 / eta^2 - exp(eta) / expm1(eta)^2, evaluated with mpmath at 120 significant digits.
"""

import math

import mpmath
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import integrate, stats

import pyro_vae
from pyro_vae.distributions import StableContinuousBernoulli, cb_log_partition, cb_mean, cb_variance
from pyro_vae.likelihoods import LIKELIHOODS, build_likelihood

mpmath.mp.dps = 120

LOGITS = [0.0, 1e-30, 1e-8, 1e-4, 0.01, 0.5, 0.999, 1.0, 1.001, 2.0, 5.0, 15.9, 16.0, 17.0, 30.0, 36.0, 37.0,
          50.0, 88.0, 89.0, 100.0, 200.0]
LOGITS = sorted(set(LOGITS + [-e for e in LOGITS]))
# relative tolerance (of a log-density: of max(1, |log p|), i.e. relative error of the density itself)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _mp(v):
    return mpmath.mpf(float(v))


def ref_log_prob(eta, x):
    eta, x = _mp(eta), _mp(x)
    return mpmath.mpf(0) if eta == 0 else x * eta + mpmath.log(eta / mpmath.expm1(eta))


def ref_mean(eta):
    eta = _mp(eta)
    return mpmath.mpf(1) / 2 if eta == 0 else 1 / (1 - mpmath.exp(-eta)) - 1 / eta


def ref_variance(eta):
    eta = _mp(eta)
    return mpmath.mpf(1) / 12 if eta == 0 else 1 / eta**2 - mpmath.exp(eta) / mpmath.expm1(eta) ** 2


def ref_cdf(eta, x):
    eta, x = _mp(eta), _mp(x)
    return x if eta == 0 else mpmath.expm1(eta * x) / mpmath.expm1(eta)


def _lik(eta, dtype):
    return pyro_vae.ContinuousBernoulli()(torch.tensor(eta, dtype=dtype))


def test_repro_logit_minus_50():
    # float32, as the decoder produces it: log p(0) = log(50 / tanh(25)) = 3.9120, mean 1/50 - 1/(e^50 - 1)
    d = _lik(-50.0, torch.float32)
    assert d.log_prob(torch.tensor(0.0)).item() == pytest.approx(math.log(50 / math.tanh(25)), rel=1e-6)
    assert d.mean.item() == pytest.approx(0.02, rel=1e-6)
    # and it is a density: the trapezoid rule on a fine grid (its error here is ~1e-7)
    xs = torch.linspace(0, 1, 200001, dtype=torch.float64)
    assert torch.trapezoid(d.log_prob(xs.float()).double().exp(), xs).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eta", [0.0, 1e-4, -1e-4, 1.0, -1.0, 16.0, -16.0, 50.0, -50.0, 100.0, -100.0, 200.0,
                                 -200.0])
def test_integrates_to_one(eta, dtype):
    d = _lik(eta, dtype)

    def density(x):
        return math.exp(d.log_prob(torch.tensor(x, dtype=dtype)).item())

    # break points where the mass of a steep exponential sits (within a few 1/|eta| of an end)
    ends = [] if eta == 0 else sorted({min(1.0, k / abs(eta)) for k in (1, 5, 20)} | {max(0.0, 1 - k / abs(eta))
                                                                                      for k in (1, 5, 20)})
    # float32 log-densities carry a relative error of a few eps (~1e-7) into every value of the density
    tol = 1e-6 if dtype == torch.float32 else 1e-11
    total, err = integrate.quad(density, 0, 1, points=ends or None, limit=200, epsabs=tol / 100, epsrel=tol / 100)
    if dtype == torch.float64:  # (quad's error estimate is meaningless for a float32 integrand)
        assert err < tol
    assert total == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_mean_variance_match_mpmath(dtype):
    eta = torch.tensor(LOGITS, dtype=dtype)
    d = StableContinuousBernoulli(logits=eta)
    rtol = RTOL[dtype]
    for x in (0.0, 0.3, 0.5, 1.0):
        xv = torch.full_like(eta, x)
        got = d.log_prob(xv)
        for e, g in zip(eta.tolist(), got.tolist()):
            ref = ref_log_prob(e, float(xv[0]))
            assert abs(g - float(ref)) <= rtol * max(1.0, abs(float(ref))), (e, x, g, float(ref))
    for name, got, ref_fn in (("mean", d.mean, ref_mean), ("variance", d.variance, ref_variance)):
        for e, g in zip(eta.tolist(), got.tolist()):
            ref = float(ref_fn(e))
            assert abs(g - ref) <= rtol * abs(ref), (name, e, g, ref)
    for e, g in zip(eta.tolist(), d.entropy().tolist()):
        ref = -(ref_mean(e) * _mp(e) + ref_log_prob(e, 0.0))
        assert abs(g - float(ref)) <= rtol * max(1.0, abs(float(ref))), ("entropy", e, g, float(ref))
    for e, g in zip(eta.tolist(), d._cont_bern_log_norm().tolist()):
        ref = ref_log_prob(e, 0.0) + mpmath.log1p(mpmath.exp(_mp(e)))  # log(eta / tanh(eta / 2))
        assert abs(g - float(ref)) <= rtol * max(1.0, abs(float(ref))), ("log C", e, g, float(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cdf_and_icdf_match_mpmath(dtype):
    eta = torch.tensor(LOGITS, dtype=dtype)
    d = StableContinuousBernoulli(logits=eta)
    rtol = RTOL[dtype]
    for x in (0.0, 0.3, 0.7, 1.0):
        got = d.cdf(torch.full_like(eta, x))
        for e, g in zip(eta.tolist(), got.tolist()):
            xv = float(torch.tensor(x, dtype=dtype))
            ref = float(ref_cdf(e, xv))
            # the CDF's condition number in x is x p(x) / F(x) <= 1 + |eta|: one rounding of x costs that much
            tiny = torch.finfo(dtype).tiny  # below it, the value underflows
            assert abs(g - ref) <= 4 * rtol * (1 + abs(e)) * ref + tiny, (e, x, g, ref)
    for u in (0.0, 0.1, 0.5, 0.9, 1.0):
        x = d.icdf(torch.full_like(eta, u))
        assert bool(((x >= 0) & (x <= 1)).all())
        back = d.cdf(x)
        assert torch.allclose(back, torch.full_like(back, u), atol=4 * rtol * (1 + eta.abs().max().item()))


def test_gradients_finite_and_exact():
    # d log p(x) / d eta = x - E[x]; d E[x] / d eta = Var[x]; at 0, +-1 (the branch point) and +-200
    for dtype in (torch.float32, torch.float64):
        for e in (0.0, 1e-38, 1e-4, -1.0, 1.0, 0.999, 16.0, -200.0, 200.0, 1000.0):
            eta = torch.tensor(e, dtype=dtype, requires_grad=True)
            d = StableContinuousBernoulli(logits=eta)
            lp = d.log_prob(torch.tensor(0.3, dtype=dtype))
            (g_lp,) = torch.autograd.grad(lp, eta)
            (g_mean,) = torch.autograd.grad(d.mean, eta)
            others = d.variance + d.entropy() + d.rsample((64,)).sum() + d.cdf(torch.tensor(0.3, dtype=dtype))
            (g_other,) = torch.autograd.grad(others, eta)
            assert torch.isfinite(g_other), (e, dtype)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert g_lp.item() == pytest.approx(0.3 - float(ref_mean(e)), rel=tol, abs=tol)
            assert g_mean.item() == pytest.approx(float(ref_variance(e)), rel=10 * tol, abs=tol * 1e-3)


@pytest.mark.parametrize("eta", [0.0, 1e-4, -0.7, 3.0, -16.0, 50.0, -200.0])
def test_sampler_matches_the_distribution(eta):
    # Kolmogorov-Smirnov against the exact CDF (float64), n = 4000: with a fixed seed the test is
    # deterministic; for a random seed p < 1e-4 would be a false failure 1 time in 10,000 per logit and dtype.
    torch.manual_seed(0)
    exact = StableContinuousBernoulli(logits=torch.tensor(eta, dtype=torch.float64))

    def cdf(v):
        return exact.cdf(torch.as_tensor(v)).numpy()

    for dtype in (torch.float32, torch.float64):
        d = StableContinuousBernoulli(logits=torch.tensor(eta, dtype=dtype))
        x = d.sample((4000,))
        assert x.dtype == dtype and bool(((x >= 0) & (x <= 1)).all())
        p = stats.kstest(x.double().numpy(), cdf).pvalue
        assert p > 1e-4, (eta, dtype, p)
        # empirical mean within 4.5 standard errors (false-failure rate ~7e-6)
        se = math.sqrt(float(ref_variance(float(d.logits))) / len(x))
        assert abs(x.double().mean().item() - float(ref_mean(float(d.logits)))) < 4.5 * se


def test_works_in_pyro_traces_plates_and_expand():
    eta = torch.tensor([[-200.0, -1e-4, 0.0, 50.0]])
    d = pyro_vae.ContinuousBernoulli()(eta)
    assert isinstance(d, StableContinuousBernoulli)
    big = d.expand((3, 4))
    assert type(big) is StableContinuousBernoulli and big.batch_shape == (3, 4)
    assert torch.equal(big.mean, d.mean.expand(3, 4))
    x = torch.tensor([[0.0, 0.3, 0.5, 1.0]])
    ev = d.to_event(1)
    assert ev.event_shape == (4,) and torch.allclose(ev.log_prob(x), d.log_prob(x).sum(-1))

    def model():
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.sample("y", StableContinuousBernoulli(logits=eta.expand(3, 4)).to_event(1), obs=x.expand(3, 4))
            pyro.sample("w", StableContinuousBernoulli(logits=eta.expand(3, 4)).to_event(1))

    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    assert torch.allclose(tr.nodes["y"]["log_prob"], d.log_prob(x).sum(-1).expand(3))
    assert tr.nodes["w"]["value"].shape == (3, 4)
    # an infinite logit is a point mass, not a density: validation names the parameter
    with pytest.raises(ValueError, match="logits"):
        StableContinuousBernoulli(logits=torch.tensor([float("inf")]))


def test_vae_paths_use_the_exact_distribution():
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((6,), 2, likelihood="continuous-bernoulli", hidden=(8,))
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(60.0)  # logits in the hundreds: far beyond torch's clamp at |eta| ~ 16
    z = torch.randn(5, 2)
    x = torch.rand(5, 6)
    tr = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    px = tr.nodes["x"]["fn"]
    out = px.base_dist.logits  # the decoder's output for z, (5, 6)
    assert isinstance(px.base_dist, StableContinuousBernoulli) and out.abs().max() > 50
    exact = (x * out - cb_log_partition(out)).sum(-1)  # per data point
    assert torch.allclose(px.log_prob(x), exact, rtol=1e-5, atol=1e-4)
    assert torch.allclose(vae.decode(z, mean=True), cb_mean(out))
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, x))


def test_helpers_are_consistent():
    eta = torch.linspace(-300, 300, 6001, dtype=torch.float64, requires_grad=True)
    k = cb_log_partition(eta)
    (dk,) = torch.autograd.grad(k.sum(), eta, create_graph=True)
    assert torch.allclose(dk, cb_mean(eta), rtol=1e-12, atol=1e-15)
    (d2k,) = torch.autograd.grad(dk.sum(), eta)
    assert torch.allclose(d2k, cb_variance(eta), rtol=1e-9, atol=1e-15)
    p = StableContinuousBernoulli(logits=torch.tensor([-60.0, 0.0, 2.0]))
    q = StableContinuousBernoulli(logits=torch.tensor([3.0, -1e-3, 2.0]))
    kl = torch.distributions.kl_divergence(p, q)
    xs = torch.linspace(0, 1, 100001, dtype=torch.float64)
    pd = StableContinuousBernoulli(logits=p.logits.double()[:, None])
    qd = StableContinuousBernoulli(logits=q.logits.double()[:, None])
    integrand = pd.log_prob(xs).exp() * (pd.log_prob(xs) - qd.log_prob(xs))
    assert torch.allclose(kl.double(), torch.trapezoid(integrand, xs), atol=1e-5)
    assert kl[2].abs() < 1e-6


# ------------------------------------------------------------------ every built-in likelihood is normalized
_finite = st.floats(-60.0, 60.0, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(LIKELIHOODS)), outs=st.lists(_finite, min_size=1, max_size=3),
       scale=st.floats(0.05, 2.0), big=st.sampled_from([1.0, 4.0]))
def test_every_builtin_likelihood_is_normalized(name, outs, scale, big):
    out = torch.tensor(outs, dtype=torch.float32) * big
    spec = {"name": name, "scale": scale} if name == "normal" else name
    lik = build_likelihood(spec, (len(outs),))
    if name == "normal-learned":
        with torch.no_grad():
            lik.rho.fill_(math.log(math.expm1(scale)))
    d = lik(out)
    assert tuple(d.batch_shape) == tuple(out.shape)
    if name == "bernoulli":
        total = d.log_prob(torch.zeros_like(out)).exp() + d.log_prob(torch.ones_like(out)).exp()
        assert torch.allclose(total.double(), torch.ones(len(outs), dtype=torch.float64), atol=1e-6)
        return
    for i in range(len(outs)):
        entry = torch.zeros(len(outs))

        def density(v, i=i, entry=entry):
            entry[i] = v
            return math.exp(d.log_prob(entry)[i].item())

        tol = 2e-6
        if name == "continuous-bernoulli":
            lo, hi, pts = 0.0, 1.0, [0.01, 0.05, 0.95, 0.99]
        else:
            loc, s = float(d.mean[i].detach()), float(d.stddev[i].detach())
            lo, hi, pts = loc - 12 * s, loc + 12 * s, [loc - s, loc, loc + s]
            # the float32 density sees v - loc rounded to float32's spacing at |loc|: a relative error of
            # about eps * |loc| / s in the standardized value, hence in the integral
            tol += 4 * torch.finfo(torch.float32).eps * abs(loc) / s
        total, _ = integrate.quad(density, lo, hi, points=pts, limit=200)
        assert total == pytest.approx(1.0, abs=tol), (name, float(out[i]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eta", [-1e10, -1e6, -300.0, -5.0, 5.0, 300.0, 1e6, 1e10])
def test_log_partition_and_entropy_at_large_logits_match_mpmath(eta, dtype):
    """No two terms that grow like |eta| are subtracted: K(eta) keeps its relative accuracy and the entropy
    (which only grows like -log|eta|) its absolute accuracy out to |eta| = 1e10."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    e = mpmath.mpf(eta)
    k_ref = mpmath.log(mpmath.expm1(e) / e)
    h_ref = k_ref - (1 / (1 - mpmath.exp(-e)) - 1 / e) * e
    t = torch.tensor(eta, dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert float(cb_log_partition(t)) == pytest.approx(float(k_ref), rel=8 * eps, abs=8 * eps)
    assert float(StableContinuousBernoulli(logits=t).entropy()) == pytest.approx(float(h_ref), abs=64 * eps)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("scale", [1e4, 1e5, 1e7])
def test_kl_between_large_logits_matches_mpmath(sign, scale):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    ep, eq = mpmath.mpf(sign * scale), mpmath.mpf(sign * 1.1 * scale)

    def k(e):
        return mpmath.log(mpmath.expm1(e) / e)

    ref = (1 / (1 - mpmath.exp(-ep)) - 1 / ep) * (ep - eq) - k(ep) + k(eq)
    p = StableContinuousBernoulli(logits=torch.tensor(sign * scale))
    q = StableContinuousBernoulli(logits=torch.tensor(sign * 1.1 * scale))
    assert float(torch.distributions.kl_divergence(p, q)) == pytest.approx(float(ref), rel=1e-3)


def test_float16_variance_does_not_underflow_at_large_logits():
    v = StableContinuousBernoulli(logits=torch.tensor(300.0, dtype=torch.float16)).variance
    assert float(v) == pytest.approx(1 / 300.0**2, rel=1e-2)
