"""The VAE as a building block of a larger Pyro model: name prefixes, outer plates, Predictive, poutine
handlers and autoguides on global sites."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.contrib.autoname import scope
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

import pyro_vae

D, Z, B = 6, 3, 5


def small_vae(name: str = "", **kw) -> pyro_vae.VAE:
    kw.setdefault("likelihood", "normal")
    return pyro_vae.VAE((D,), Z, hidden=(8,), name=name, **kw)


def sample_sites(trace) -> dict[str, tuple[int, ...]]:
    return {n: tuple(s["value"].shape) for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["name"].endswith("data")}


def test_two_prefixed_vaes_in_one_model_trace_without_clashes():
    a, b = small_vae("a"), small_vae("b", likelihood="continuous-bernoulli")
    xa, xb = torch.randn(B, D), torch.rand(4, D)

    def model(xa, xb):
        a.model(xa)
        b.model(xb)

    def guide(xa, xb):
        a.guide(xa)
        b.guide(xb)

    gtrace = poutine.trace(guide).get_trace(xa, xb)
    mtrace = poutine.trace(poutine.replay(model, trace=gtrace)).get_trace(xa, xb)
    assert sample_sites(mtrace) == {"a/z": (B, Z), "a/x": (B, D), "b/z": (4, Z), "b/x": (4, D)}
    assert {"a/data", "b/data"} <= set(mtrace.nodes)
    params = set(pyro.get_param_store().keys())
    assert any(p.startswith("a/encoder") for p in params) and any(p.startswith("b/encoder") for p in params)
    assert any(p.startswith("a/decoder") for p in params) and any(p.startswith("b/decoder") for p in params)
    # One SVI step moves both VAEs' parameters.
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(xa, xb))
    after = list((*a.parameters(), *b.parameters()))
    assert all(not torch.equal(p0, p1) for p0, p1 in zip(before, after))


def test_two_unprefixed_vaes_clash_and_pyro_says_so():
    # Without name= the second VAE reuses the site "z": Pyro refuses, which is why name= exists.
    a, b = small_vae(), small_vae()
    x = torch.randn(B, D)

    def model(x):
        a.model(x)
        b.model(x)

    with pytest.raises(Exception, match="Multiple sample sites named|already|name"):
        poutine.trace(model).get_trace(x)


def test_autoname_scope_prefixes_the_sites():
    vae = small_vae()
    x = torch.randn(B, D)

    def model(x):
        with scope(prefix="left"):
            vae.model(x)

    trace = poutine.trace(model).get_trace(x)
    assert {"left/z", "left/x"} <= set(trace.nodes)


@pytest.mark.parametrize("num_data", [None, 20])
def test_outer_plate_on_the_left_broadcasts_data(num_data):
    # An outer plate (replicates, groups) sits left of the VAE's "data" plate: dim=-2.
    vae = small_vae("v")
    x = torch.randn(B, D)  # the same batch for each of 3 replicates

    def model(x):
        with pyro.plate("rep", 3, dim=-2):
            vae.model(x, num_data=num_data)

    def guide(x):
        with pyro.plate("rep", 3, dim=-2):
            vae.guide(x, num_data=num_data)

    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["v/z"]["value"].shape == (3, B, Z)
    mtrace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(x)
    mtrace.compute_log_prob()
    assert mtrace.nodes["v/x"]["log_prob"].shape == (3, B)
    assert math.isfinite(Trace_ELBO(max_plate_nesting=2).loss(model, guide, x))


def test_outer_plate_over_groups_of_data():
    # x of shape (G, B, D): G groups under the user's plate, B points per group under the VAE's plate;
    # each group has its own global shift of the latent prior's mean.
    shift = {"value": torch.zeros(Z)}
    vae = small_vae("v", prior=lambda: dist.Normal(shift["value"], 1.0).to_event(1))
    x = torch.randn(4, B, D)

    def model(x):
        with pyro.plate("groups", x.shape[0], dim=-2):
            shift["value"] = pyro.sample("shift", dist.Normal(0.0, 1.0).expand([1, Z]).to_event(1))
            vae.model(x)

    def guide(x):
        loc = pyro.param("shift_loc", torch.zeros(x.shape[0], 1, Z))
        with pyro.plate("groups", x.shape[0], dim=-2):
            pyro.sample("shift", dist.Normal(loc, 0.1).to_event(1))
            vae.guide(x)

    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["shift"]["value"].shape == (4, 1, Z)
    assert trace.nodes["v/z"]["value"].shape == (4, B, Z)
    elbo = Trace_ELBO(max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert all(math.isfinite(svi.step(x)) for _ in range(3))


def test_vectorized_particles_with_a_prefix():
    vae = small_vae("p")
    x = torch.randn(B, D)
    loss = Trace_ELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert math.isfinite(loss)


@pytest.mark.parametrize("name,data_shape", [("", (D,)), ("img", (1, 4, 4))])
def test_predictive_returns_the_documented_sites_and_shapes(name, data_shape):
    vae = pyro_vae.VAE(data_shape, Z, hidden=(8,), name=name, likelihood="normal")

    def site(s):
        return f"{name}/{s}" if name else s

    x = torch.randn(B, *data_shape)
    post = Predictive(vae.model, guide=vae.guide, num_samples=11)(x)
    assert {k: tuple(v.shape) for k, v in post.items()} == {site("z"): (11, B, Z), site("x"): (11, B, *data_shape)}
    prior = Predictive(vae.model, num_samples=2)(None, batch_size=4)
    assert {k: tuple(v.shape) for k, v in prior.items()} == {site("z"): (2, 4, Z), site("x"): (2, 4, *data_shape)}


def global_noise_model():
    """A VAE whose likelihood scale is a global latent with its own prior (the examples/global_latent.py model)."""
    vae = small_vae("vae", likelihood=lambda out, sigma, **context: dist.Normal(out, sigma))

    def model(x=None, num_data=None, batch_size=None):
        sigma = pyro.sample("sigma", dist.LogNormal(math.log(0.5), 0.5))
        return vae.model(x, num_data=num_data, batch_size=batch_size, sigma=sigma)

    return vae, model


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDelta])
def test_autoguide_on_the_global_site_with_the_encoder_on_the_local_ones(autoguide):
    vae, model = global_noise_model()
    global_guide = autoguide(poutine.block(model, expose=["sigma"]))

    def guide(x=None, num_data=None, batch_size=None):
        global_guide(x, num_data, batch_size)
        return vae.guide(x, num_data=num_data)

    x = torch.randn(20, D)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO())
    first = svi.step(x[:10], num_data=20)
    for _ in range(60):
        last = svi.step(x[:10], num_data=20)
    assert math.isfinite(first) and last < first
    # The global site is the autoguide's; the local one is the encoder's.
    gtrace = poutine.trace(guide).get_trace(x)
    assert gtrace.nodes["sigma"]["value"].shape == () and gtrace.nodes["vae/z"]["value"].shape == (20, Z)
    post = Predictive(model, guide=guide, num_samples=9, return_sites=["sigma", "vae/z"])(x)
    # Predictive pads a global site to (num_samples, 1): one dimension per plate of the model.
    assert post["sigma"].shape == (9, 1) and post["vae/z"].shape == (9, 20, Z)
    rep = Predictive(model, posterior_samples=post, return_sites=["vae/x"])(None, batch_size=20)
    assert rep["vae/x"].shape == (9, 20, D)


def test_condition_and_do_on_the_global_and_local_sites():
    vae, model = global_noise_model()
    x = torch.randn(B, D)
    sigma = torch.tensor(0.05)

    trace = poutine.trace(poutine.condition(model, data={"sigma": sigma})).get_trace(x)
    assert trace.nodes["sigma"]["is_observed"] and torch.equal(trace.nodes["sigma"]["value"], sigma)
    assert torch.equal(trace.nodes["vae/x"]["fn"].base_dist.scale, sigma.expand(B, D))

    # do: the model downstream sees sigma = 3 (the trace keeps a draw of "sigma" from its prior, unused);
    # draws of x scatter with that scale.
    with torch.no_grad():
        trace = poutine.trace(poutine.do(model, data={"sigma": torch.tensor(3.0)})).get_trace(batch_size=4000)
    assert torch.all(trace.nodes["vae/x"]["fn"].base_dist.scale == 3.0)
    assert not trace.nodes["sigma"]["is_observed"] and float(trace.nodes["sigma"]["value"]) != 3.0
    resid = trace.nodes["vae/x"]["value"] - trace.nodes["_RETURN"]["value"]
    # 4000 * 6 standard normal residuals times 3: the sample sd is within 5 standard errors of 3.0
    # (se = 3 / sqrt(2 * 24000)); false-failure rate below 1e-6.
    assert abs(float(resid.std()) - 3.0) < 5 * 3.0 / math.sqrt(2 * 24000)

    # condition on the local latent: the decoder then sees exactly that z.
    z = torch.zeros(B, Z)
    out = poutine.condition(vae.model, data={"vae/z": z})(x, sigma=torch.tensor(0.5))
    assert torch.allclose(out, vae.decoder(z))
