"""Clear errors for context values of the wrong number of rows, and for global latents passed as context whose
shape does not broadcast against the data plate (e.g. under vectorized particles)."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_vae
from pyro_vae import generation
from pyro_vae.errors import ConfigError, DataError, ShapeError
from pyro_vae.imputation import impute


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.rand(40, 6)
    y = torch.eye(3)[torch.arange(40) % 3]
    vae = pyro_vae.VAE((6,), 2, hidden=(8,), name="c", likelihood="continuous-bernoulli",
                       encoder_context={"y": (3,)}, decoder_context={"y": (3,)})
    return vae, x, y


CALLS = {
    "sample": (lambda v, x, y: v.sample(5, y=y[:3]), 5, 3),
    "encode": (lambda v, x, y: v.encode(x[:4], y=y[:5]), 4, 5),
    "reconstruct": (lambda v, x, y: v.reconstruct(x[:4], y=y), 4, 40),
    "impute": (lambda v, x, y: impute(v, x[:4], torch.rand(4, 6) > 0.5, y=y), 4, 40),
    "generation.sample": (lambda v, x, y: generation.sample(v, 5, y=y[:3]), 5, 3),
    "generation.reconstruct": (lambda v, x, y: generation.reconstruct(v, x[:4], y=y), 4, 40),
    "posterior_samples": (lambda v, x, y: generation.posterior_samples(v, x[:4], y=y[:5]), 4, 5),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_wrong_rows_is_a_data_error(setup, name):
    vae, x, y = setup
    call, expected, found = CALLS[name]
    with pytest.raises(DataError) as info:
        call(vae, x, y)
    text = str(info.value)
    assert "'y'" in text
    assert f"first dimension of {expected}" in text and f"{found} rows" in text
    assert "Fix" in text or "fix" in text


def test_right_rows_and_global_values_still_work(setup):
    vae, x, y = setup
    assert vae.sample(5, y=y[:5]).shape == (5, 6)
    assert vae.sample(5, y=y[0]).shape == (5, 6)  # one global value for every sample
    assert vae.encode(x[:4], y=y[:4]).shape == (4, 2)
    assert vae.reconstruct(x[:4], y=y[:4]).shape == (4, 6)
    assert impute(vae, x[:4], torch.rand(4, 6) > 0.5, y=y[:4], num_samples=8).shape == (4, 6)


def _chained(error: BaseException, kind: type) -> bool:
    """Whether an exception of ``kind`` is in ``error``'s chain of causes (Pyro's trace re-raises the error once,
    with the trace's shapes, chained to it)."""
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, kind) and not isinstance(cause, ShapeError):
            return True
        cause = cause.__cause__
    return False


def _sigma_pair(trailing: bool):
    import pyro
    import pyro.distributions as dist

    pyro.clear_param_store()
    vae = pyro_vae.VAE((4,), 2, hidden=(8,), name="vae",
                       likelihood=lambda out, scale=1.0, **c: dist.Normal(out, scale))

    def model(x, num_data=None):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        return vae.model(x, num_data=num_data, scale=sigma[..., None] if trailing else sigma)

    def guide(x, num_data=None):
        pyro.sample("sigma", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.2))
        vae.guide(x, num_data=num_data)

    return pyro_vae.ModelGuidePair(model, guide, modules=vae)


def test_global_latent_without_event_dims_under_particles_is_a_shape_error():
    x = torch.randn(50, 4)
    with pytest.raises(ShapeError) as info:
        pyro_vae.fit(_sigma_pair(False), x, epochs=1, batch_size=10, num_particles=2, progress=False, seed=0)
    text = str(info.value)
    assert 'likelihood at site "vae/x"' in text
    assert "scale: (2, 1)" in text and "decoder output of shape (2, 10, 4)" in text
    assert "[..., None]" in text and "vectorized particles" in text
    assert _chained(info.value, RuntimeError)


@pytest.mark.parametrize("particles", [1, 2])
def test_global_latent_with_a_trailing_dim_trains_with_particles(particles):
    x = torch.randn(50, 4)
    history = pyro_vae.fit(_sigma_pair(True), x, epochs=1, batch_size=10, num_particles=particles,
                           progress=False, seed=0)
    assert len(history.epochs) == 1


def test_prior_context_that_does_not_broadcast_is_a_shape_error():
    import pyro.distributions as dist
    from pyro import poutine

    vae = pyro_vae.VAE((4,), 2, hidden=(8,), name="p",
                       prior=lambda m=0.0, **c: dist.Normal(torch.zeros(2) + m, 1.0).to_event(1))
    with pytest.raises(ShapeError) as info:
        poutine.trace(vae.model).get_trace(torch.rand(5, 4).round(), m=torch.ones(3))
    text = str(info.value)
    assert 'prior at site "p/z"' in text and "m: (3,)" in text and "(2,)" in text
    assert _chained(info.value, RuntimeError)


def test_other_runtime_errors_of_a_likelihood_pass_through():
    import pyro.distributions as dist
    from pyro import poutine

    def likelihood(out, **context):
        if context:
            raise RuntimeError("a failure of the likelihood's own")
        return dist.Normal(out, 1.0)

    vae = pyro_vae.VAE((4,), 2, hidden=(8,), name="r", likelihood=likelihood)
    with pytest.raises(RuntimeError, match="of the likelihood's own"):
        poutine.trace(vae.model).get_trace(torch.randn(5, 4), scale=torch.ones(3))


@pytest.mark.parametrize("net", ["conv", "linear", "nonlinear", "nonlinear-leaky"])
def test_built_in_networks_that_take_no_context_are_refused_with_it(net):
    pyro.clear_param_store()
    with pytest.raises(ConfigError, match="encoder"):
        pyro_vae.VAE((12,), 3, encoder=net, encoder_context={"y": (2,)})
    with pytest.raises(ConfigError, match="decoder"):
        pyro_vae.VAE((12,), 3, decoder=net, decoder_context={"y": (2,)})
