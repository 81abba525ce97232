"""Named context flows from an enclosing Pyro model into the VAE's parts: ``vae.model(x, **context)`` calls
``prior(**context)`` and ``likelihood(decoder_output, **context)`` inside the data plate, and the encoder and
decoder with their ``encoder_context`` / ``decoder_context`` values. Each test compares the log-densities Pyro
traced with the same distributions built by hand; none is statistical."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

import pyro_vae
from pyro_vae.errors import ConfigError, DataError, ShapeError
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import PRIORS

D, Z, B, C = 6, 3, 5, 2


def group_prior(g, **context):
    """p(z | g) = N(g, 1) on every latent dimension: the prior of a group offset g sampled outside the VAE."""
    return dist.Normal(g[..., None] * torch.ones(Z), 1.0).to_event(1)


def scaled_likelihood(out, sigma, **context):
    """p(x | z, sigma) = N(decoder output, sigma): a likelihood whose scale is a global latent."""
    return dist.Normal(out, sigma)


def traced(model, guide, *args, **kwargs):
    """The guide's trace and the model's trace replayed against it, log-densities computed."""
    gtrace = poutine.trace(guide).get_trace(*args, **kwargs)
    mtrace = poutine.trace(poutine.replay(model, trace=gtrace)).get_trace(*args, **kwargs)
    gtrace.compute_log_prob()
    mtrace.compute_log_prob()
    return gtrace, mtrace


def encoder_normal(vae, x, y):
    """q(z | x, y) computed from the encoder's network by hand: the "mlp" encoder concatenates x and y."""
    h = vae.encoder.net.net.mlp(torch.cat([x, y.expand(*x.shape[:-1], C)], -1))
    loc, raw = h.split(Z, -1)
    return dist.Normal(loc, F.softplus(raw) + vae.encoder.min_scale).to_event(1)


def decoder_mean(vae, z, y):
    return vae.decoder.net.mlp(torch.cat([z, y.expand(*z.shape[:-1], C)], -1))


# ------------------------------------------------------------------------------------- context reaches each part
def test_a_prior_that_depends_on_a_global_latent_sampled_outside():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", prior=group_prior, name="vae")

    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 3.0))  # global: outside the VAE's plate
        return vae.model(x, g=g)

    def guide(x):
        pyro.sample("g", dist.Normal(1.5, 0.1))
        return vae.guide(x)

    x = torch.randn(B, D)
    _, mtrace = traced(model, guide, x)
    g, z = mtrace.nodes["g"]["value"], mtrace.nodes["vae/z"]["value"]
    assert g.shape == () and z.shape == (B, Z)
    expected = dist.Normal(g, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(mtrace.nodes["vae/z"]["log_prob"], expected)
    # the prior is called inside the data plate: its site is per data point
    assert [f.name for f in mtrace.nodes["vae/z"]["cond_indep_stack"]] == ["vae/data"]


def test_a_likelihood_whose_scale_is_a_global_latent():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood=scaled_likelihood, name="vae")

    def model(x):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        return vae.model(x, sigma=sigma)

    def guide(x):
        pyro.sample("sigma", dist.LogNormal(-1.0, 0.1))
        return vae.guide(x)

    x = torch.randn(B, D)
    _, mtrace = traced(model, guide, x)
    sigma, z = mtrace.nodes["sigma"]["value"], mtrace.nodes["vae/z"]["value"]
    expected = dist.Normal(vae.decoder(z), sigma).log_prob(x).sum(-1)
    assert torch.allclose(mtrace.nodes["vae/x"]["log_prob"], expected)
    # a global value from a handler reaches the likelihood too
    fixed = poutine.trace(poutine.condition(model, data={"sigma": torch.tensor(0.25)})).get_trace(x)
    assert torch.equal(fixed.nodes["vae/x"]["fn"].base_dist.scale, torch.full((B, D), 0.25))


def test_an_encoder_and_decoder_conditioned_on_a_covariate():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", encoder_context={"y": (C,)},
                       decoder_context={"y": (C,)})
    x, y = torch.randn(B, D), torch.randn(B, C)
    gtrace, mtrace = traced(vae.model, vae.guide, x, y=y)
    z = gtrace.nodes["z"]["value"]
    assert torch.allclose(gtrace.nodes["z"]["log_prob"], encoder_normal(vae, x, y).log_prob(z))
    assert torch.allclose(mtrace.nodes["x"]["log_prob"], dist.Normal(decoder_mean(vae, z, y), 0.1).log_prob(x).sum(-1))
    assert torch.allclose(mtrace.nodes["z"]["log_prob"], dist.Normal(0.0, 1.0).log_prob(z).sum(-1))
    # the covariate matters, and a global covariate (no batch dimension) meets every data point
    other = poutine.trace(vae.guide).get_trace(x, y=y + 1).nodes["z"]["fn"]
    assert not torch.allclose(other.base_dist.loc, gtrace.nodes["z"]["fn"].base_dist.loc)
    one = poutine.trace(vae.guide).get_trace(x, y=y[0]).nodes["z"]["fn"]
    assert torch.allclose(one.base_dist.loc, encoder_normal(vae, x, y[0].expand(B, C)).base_dist.loc)


class ShiftedLinear(torch.nn.Module):
    """A network of yours conditioned on a covariate: ``forward(v, y)`` is ``linear(v) + shift(y)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear, self.shift = torch.nn.Linear(n_in, n_out), torch.nn.Linear(C, n_out)

    def forward(self, v, y):
        return self.linear(v) + self.shift(y)


def test_networks_of_yours_get_the_context_as_keyword_arguments():
    enc, dec = ShiftedLinear(D, 2 * Z), ShiftedLinear(Z, D)
    vae = pyro_vae.VAE((D,), Z, encoder=enc, decoder=dec, likelihood="normal", encoder_context={"y": (C,)},
                       decoder_context={"y": (C,)})
    x, y = torch.randn(B, D), torch.randn(B, C)
    gtrace, mtrace = traced(vae.model, vae.guide, x, y=y)
    z = gtrace.nodes["z"]["value"]
    loc, raw = enc(x, y).split(Z, -1)
    q = dist.Normal(loc, F.softplus(raw) + vae.encoder.min_scale).to_event(1)
    assert torch.allclose(gtrace.nodes["z"]["log_prob"], q.log_prob(z))
    assert torch.allclose(mtrace.nodes["x"]["log_prob"], dist.Normal(dec(z, y), 0.1).log_prob(x).sum(-1))


def test_per_data_point_context_is_subsampled_with_the_data_plate():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), encoder_context={"y": (C,)}, decoder_context={"y": (C,)},
                       likelihood=lambda out, s, **context: dist.Normal(out, s.unsqueeze(-1)))
    n, size = 20, 4
    x, y, s = torch.randn(n, D), torch.randn(n, C), torch.linspace(0.1, 2.0, n)
    gtrace, mtrace = traced(vae.model, vae.guide, x, subsample_size=size, y=y, s=s)
    idx = gtrace.nodes["data"]["value"]
    assert idx.shape == (size,) and torch.equal(mtrace.nodes["data"]["value"], idx)  # the model replays them
    assert not torch.equal(idx, torch.arange(size))  # seeded: a random subsample
    z = gtrace.nodes["z"]["value"]
    assert z.shape == (size, Z)
    # the traced log-densities are scaled to the full data set: n / size
    assert mtrace.nodes["x"]["scale"] == n / size and gtrace.nodes["z"]["scale"] == n / size
    q = encoder_normal(vae, x[idx], y[idx])
    assert torch.allclose(gtrace.nodes["z"]["log_prob"], n / size * q.log_prob(z))
    expected = dist.Normal(decoder_mean(vae, z, y[idx]), s[idx].unsqueeze(-1)).log_prob(x[idx]).sum(-1)
    assert torch.allclose(mtrace.nodes["x"]["log_prob"], n / size * expected)


def test_the_minibatch_form_takes_the_minibatch_rows_and_refuses_the_full_ones():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", encoder_context={"y": (C,)})
    x, y = torch.randn(20, D), torch.randn(20, C)
    gtrace = poutine.trace(vae.guide).get_trace(x[:B], num_data=20, y=y[:B])
    assert gtrace.nodes["z"]["value"].shape == (B, Z) and gtrace.nodes["z"]["scale"] == 20 / B
    with pytest.raises(DataError, match=r"context 'y'.*num_data = 20 rows.*subsample_size=5"):
        vae.guide(x[:B], num_data=20, y=y)


# ------------------------------------------------------------------------------------------------- clear errors
def test_a_user_prior_that_does_not_take_the_context_gets_a_clear_error():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal",
                       prior=lambda: dist.Normal(torch.zeros(Z), 1.0).to_event(1))
    x = torch.randn(B, D)
    vae.model(x)  # no context: called as before
    with pytest.raises(ConfigError, match=r"prior at site \"z\".*context names: 'g'.*add \*\*context"):
        vae.model(x, g=torch.tensor(1.0))


def test_a_user_likelihood_that_does_not_take_the_context_gets_a_clear_error():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood=lambda out: dist.Normal(out, 0.1), prior=group_prior)
    with pytest.raises(ConfigError, match=r"likelihood at site \"x\".*context names: 'g'.*add \*\*context"):
        vae.model(torch.randn(B, D), g=torch.tensor(1.0))


def test_a_part_that_needs_a_context_value_not_given_gets_a_clear_error():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood=scaled_likelihood, prior=group_prior)
    x = torch.randn(B, D)
    with pytest.raises(ConfigError, match=r"prior at site \"z\".*missing a required argument: 'g'"):
        vae.model(x)
    with pytest.raises(ConfigError, match=r"likelihood at site \"x\".*'sigma'"):
        vae.model(x, g=torch.tensor(0.0))
    conditioned = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", name="c", encoder_context={"y": (C,)})
    with pytest.raises(ConfigError, match=r"encoder_context names \['y'\].*none for \['y'\]"):
        conditioned.guide(x)


def test_the_built_in_priors_and_likelihoods_take_any_context_and_ignore_it():
    for name in ("normal", "mixture", "flow", "laplace", "student-t"):
        prior = PRIORS[name](Z)
        z = torch.randn(4, Z)
        assert torch.equal(prior(g=torch.tensor(1.0), y=3).log_prob(z), prior().log_prob(z))
    out = torch.randn(4, D)
    for name, cls in LIKELIHOODS.items():
        lik = cls((D,)) if name == "normal-learned" else cls()
        assert torch.equal(lik(out, sigma=2.0).mean, lik(out).mean)


def test_the_context_names_are_part_of_the_config():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), encoder_context={"y": (C,)}, decoder_context={"y": C})
    assert vae.config["encoder_context"] == {"y": [C]} and vae.config["decoder_context"] == {"y": [C]}
    again = pyro_vae.VAE.from_config({**vae.config, "name": "again"})
    assert again.encoder_context == {"y": (C,)} and again.decoder_context == {"y": (C,)}
    assert "encoder_context" not in pyro_vae.VAE((D,), Z, hidden=(8,), name="plain").config
    with pytest.raises(ConfigError, match="encoder_context"):
        pyro_vae.VAE((D,), Z, name="bad", encoder_context=["y"])
    with pytest.raises(ConfigError, match="encoder"):
        pyro_vae.VAE((1, 8, 8), Z, name="conv", encoder="conv", encoder_context={"y": (C,)})


# ------------------------------------------------------------------ generation, reconstruction and imputation
def twin_vaes(name: str = ""):
    """A VAE whose likelihood scale is the context value ``sigma`` and its twin with the same weights and the
    scale 0.3 fixed: given ``sigma=0.3`` the two must agree exactly."""
    pyro.clear_param_store()
    ctx = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood=scaled_likelihood, name="ctx")
    fixed = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood={"name": "normal", "scale": 0.3}, name="fixed")
    fixed.load_state_dict(ctx.state_dict())
    return ctx, fixed


def test_sample_with_a_global_context_is_one_point_per_sample():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood=scaled_likelihood, prior=group_prior)
    g, sigma = torch.tensor(2.0), torch.tensor(0.3)
    pyro.set_rng_seed(3)
    out = vae.sample(16, g=g, sigma=sigma)
    pyro.set_rng_seed(3)
    z = dist.Normal(g, 1.0).expand([Z]).to_event(1).sample((16,))
    assert out.shape == (16, D) and torch.allclose(out, vae.decoder(z))
    assert vae.sample(16, mean=False, g=g, sigma=sigma).shape == (16, D)
    assert vae.sample_prior(16, g=g).shape == (16, Z)
    # a value left over from 180 posterior draws is not a global value: an error, never (16, 180, D)
    with pytest.raises(ShapeError, match=r"batch shape \(\) \(global context\) or \(16,\)"):
        vae.sample(16, g=torch.randn(180, 1), sigma=sigma)
    with pytest.raises(ShapeError, match="likelihood"):
        vae.sample(16, g=g, sigma=torch.rand(180, 1, 1) + 0.1)
    with pytest.raises(ConfigError, match="'g'"):
        vae.sample(16)


def test_sample_with_per_data_point_context_takes_one_row_per_sample():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", decoder_context={"y": (C,)})
    y = torch.randn(16, C)
    pyro.set_rng_seed(4)
    out = vae.sample(16, y=y)
    pyro.set_rng_seed(4)
    z = dist.Normal(torch.zeros(Z), 1.0).to_event(1).sample((16,))
    assert out.shape == (16, D) and torch.allclose(out, decoder_mean(vae, z, y))
    assert vae.sample(16, y=y[0]).shape == (16, D)  # a global covariate for every sample
    pyro.set_rng_seed(4)
    assert torch.allclose(pyro_vae.generation.sample(vae, 16, y=y), out)


def test_encode_decode_and_reconstruct_take_the_context():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", encoder_context={"y": (C,)},
                       decoder_context={"y": (C,)})
    x, y = torch.randn(B, D), torch.randn(B, C)
    loc = encoder_normal(vae, x, y).mean
    assert torch.allclose(vae.encode(x, y=y), loc)
    assert torch.allclose(vae.decode(loc, y=y), decoder_mean(vae, loc, y))
    assert torch.allclose(vae.reconstruct(x, y=y), decoder_mean(vae, loc, y))
    assert vae.decode_dist(loc, y=y).batch_shape == (B,)
    gen = pyro_vae.generation
    assert torch.allclose(gen.reconstruct(vae, x, y=y), vae.reconstruct(x, y=y))
    assert torch.allclose(gen.posterior_locations(vae, x, batch_size=2, y=y), loc)  # split in batches of 2
    assert gen.posterior_samples(vae, x, batch_size=2, y=y).shape == (B, Z)
    assert gen.sample(vae, 7, "aggregate", data=x, y=y).shape == (7, D)
    path = gen.interpolate(vae, x, x.flip(0), steps=4, method="lerp", y=y)
    assert path.shape == (B, 4, D) and torch.allclose(path[:, 0], vae.reconstruct(x, y=y), atol=1e-6)
    assert gen.traverse(vae, x[0], dims=[0, 1], y=y[0]).shape == (2, 9, D)
    with pytest.raises(DataError, match="mixture"):
        gen.sample(vae, 7, "mixture", data=x, y=y)


def test_generation_and_imputation_with_a_global_context_match_the_fixed_model():
    ctx, fixed = twin_vaes()
    sigma = torch.tensor(0.3)
    gen = pyro_vae.generation
    pyro.set_rng_seed(5)
    a = gen.sample(ctx, 8, mean=False, sigma=sigma)
    pyro.set_rng_seed(5)
    assert torch.equal(a, gen.sample(fixed, 8, mean=False))
    x = torch.randn(6, D)
    mask = pyro_vae.imputation.make_mask((D,), "bottom", 6)
    for method in ("importance", "metropolis", "gibbs"):
        got = pyro_vae.imputation.impute(ctx, x, mask, method=method, num_samples=16, num_iters=4, seed=0,
                                         sigma=sigma)
        want = pyro_vae.imputation.impute(fixed, x, mask, method=method, num_samples=16, num_iters=4, seed=0)
        assert got.shape == (6, D) and torch.allclose(got, want), method
        assert torch.equal(got[mask], x[mask])


def test_imputation_splits_per_data_point_context_with_the_data():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", encoder_context={"y": (C,)},
                       decoder_context={"y": (C,)})
    x, y = torch.randn(4, D), torch.randn(4, C)
    mask = pyro_vae.imputation.make_mask((D,), "bottom", 4)
    impute = pyro_vae.imputation.impute
    whole = impute(vae, x, mask, num_samples=16, batch_size=2, seed=0, y=y)
    pyro.set_rng_seed(0)  # the same random stream, one batch at a time with its own rows
    first = impute(vae, x[:2], mask[:2], num_samples=16, batch_size=2, y=y[:2])
    second = impute(vae, x[2:], mask[2:], num_samples=16, batch_size=2, y=y[2:])
    assert whole.shape == (4, D) and torch.allclose(whole, torch.cat([first, second]))
    assert not torch.allclose(impute(vae, x, mask, num_samples=16, seed=0, y=y + 3), impute(
        vae, x, mask, num_samples=16, seed=0, y=y))
