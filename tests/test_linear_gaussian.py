"""The closed-form ELBO and log-likelihood of the linear-Gaussian VAE (pyro_vae.models.linear_gaussian), for
the VAE it builds and for the same model built as the command line's ``--net linear --likelihood normal``."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_vae import VAE
from pyro_vae.errors import ConfigError
from pyro_vae.models import linear_gaussian as lg


def _net_linear_copy(vae: VAE) -> VAE:
    """The VAE the command line builds with --net linear --likelihood normal, holding ``vae``'s weights."""
    copy = VAE((6,), 2, encoder="linear", decoder="linear", likelihood={"name": "normal", "scale": 0.5},
               name="copy")
    with torch.no_grad():
        copy.decoder.mlp.net[0].weight.copy_(vae.decoder.weight)
        copy.decoder.mlp.net[0].bias.copy_(vae.decoder.bias)
        copy.encoder.net.mlp.net[0].weight.copy_(vae.encoder.net.weight)
        copy.encoder.net.mlp.net[0].bias.copy_(vae.encoder.net.bias)
    return copy


def test_the_net_linear_vae_has_the_closed_form_of_the_same_model():
    vae = lg.linear_gaussian_vae(6, 2, noise_scale=0.5, seed=1)
    copy = _net_linear_copy(vae)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lg.exact_log_likelihood(copy, x), lg.exact_log_likelihood(vae, x))
    assert torch.allclose(lg.exact_elbo(copy, x), lg.exact_elbo(vae, x))
    lg.set_exact_guide(copy)  # orthogonal decoder columns: the exact posterior is in the guide family
    assert torch.allclose(lg.exact_elbo(copy, x), lg.exact_log_likelihood(copy, x), atol=1e-4)


@pytest.mark.parametrize("kwargs, found", [
    ({"latent": "bernoulli", "encoder": "linear", "decoder": "linear", "likelihood": "normal"}, "vae latent"),
    ({"encoder": "linear", "decoder": "linear", "likelihood": "bernoulli"}, "vae likelihood"),
    ({"encoder": "linear", "decoder": "mlp", "likelihood": "normal", "hidden": (4,)}, "decoder"),
])
def test_another_model_is_refused_with_what_is_expected(kwargs, found):
    pyro.clear_param_store()
    vae = VAE((6,), 2, **kwargs)
    x = torch.zeros(3, 6)
    for f in (lg.exact_elbo, lg.exact_log_likelihood):
        with pytest.raises(ConfigError, match=rf"^{found}: expected .*Fix: build the VAE with linear_gaussian_vae"):
            f(vae, x)
