"""Clear errors for context values of the wrong number of rows, and for global latents passed as context whose
shape does not broadcast against the data plate (e.g. under vectorized particles)."""

from __future__ import annotations

import pytest
import torch

import pyro_vae
from pyro_vae import generation
from pyro_vae.errors import DataError
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
