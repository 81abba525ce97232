"""pyro-vae: variational autoencoders as plain Pyro model/guide pairs."""

__version__ = "0.1.0"

from . import data, encoders, errors, likelihoods, networks, plots, priors  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .encoders import Encoder, GaussianEncoder  # noqa: E402
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, PyroVAEError, ShapeError  # noqa: E402
from .likelihoods import Bernoulli, ContinuousBernoulli, Normal, NormalLearnedScale  # noqa: E402
from .priors import StandardNormal  # noqa: E402
from .train import History, evaluate_elbo, fit, make_elbo  # noqa: E402
from .vae import VAE  # noqa: E402

__all__ = [
    "VAE", "fit", "evaluate_elbo", "make_elbo", "History", "load", "save",
    "Encoder", "GaussianEncoder", "StandardNormal",
    "Bernoulli", "ContinuousBernoulli", "Normal", "NormalLearnedScale",
    "PyroVAEError", "ConfigError", "DataError", "ShapeError", "CheckpointError", "NonFiniteLossError",
    "data", "encoders", "errors", "likelihoods", "networks", "plots", "priors",
]
