"""The models: Pyro ``model`` / ``guide`` pairs built from a prior, an encoder, a decoder and a likelihood."""

from pyro_vae.models.conditional import CVAE, SSVAE
from pyro_vae.models.linear_gaussian import linear_gaussian_vae
from pyro_vae.models.vae import VAE, data_plate, unit_kl_weight

__all__ = ["VAE", "CVAE", "SSVAE", "data_plate", "linear_gaussian_vae", "unit_kl_weight"]
