"""The models: Pyro ``model`` / ``guide`` pairs built from a prior, an encoder, a decoder and a likelihood."""

from pyro_vae.models.cvae import CVAE
from pyro_vae.models.linear_gaussian import linear_gaussian_vae
from pyro_vae.models.sites import Sites, data_plate
from pyro_vae.models.ssvae import SSVAE
from pyro_vae.models.vae import VAE, unit_kl_weight

__all__ = ["VAE", "CVAE", "SSVAE", "Sites", "data_plate", "linear_gaussian_vae", "unit_kl_weight"]
