"""Every quantity named ELBO is the ELBO whatever the KL weight of a VAE, also when the VAE is called from a
user's own model function that the tools cannot see into (a pair of closures, or of bound methods, without
``modules=``): the same draws give the same value as for the VAE itself."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_vae
from pyro_vae.infer.elbo import evaluate_elbo


def test_elbo_of_a_pair_hiding_a_kl_weighted_vae_is_the_elbo():
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=2, hidden=(8,), likelihood="bernoulli")
    x = torch.bernoulli(torch.full((30, 6), 0.4))
    vae.beta = 0.01

    def model(x, num_data=None):
        return vae.model(x, num_data=num_data)

    def guide(x, num_data=None):
        return vae.guide(x, num_data=num_data)

    values = []
    for obj in (vae, pyro_vae.ModelGuidePair(vae.model, vae.guide), pyro_vae.ModelGuidePair(model, guide)):
        pyro.set_rng_seed(1)
        values.append(evaluate_elbo(obj, x, num_particles=50))
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[2] == pytest.approx(values[0], rel=1e-6)
    pyro.set_rng_seed(1)
    with pyro_vae.models.vae.unit_kl_weight():  # any block: also the VAEs it cannot reach
        inside = -pyro.infer.Trace_ELBO(num_particles=50, vectorize_particles=True).loss(model, guide, x) / 30
    pyro.set_rng_seed(1)
    weighted = -pyro.infer.Trace_ELBO(num_particles=50, vectorize_particles=True).loss(model, guide, x) / 30
    assert weighted > inside + 0.05  # outside the block beta = 0.01 leaves out most of the KL
    assert vae.beta == 0.01
