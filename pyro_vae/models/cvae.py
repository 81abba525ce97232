"""The conditional VAE of Sohn et al. (2015), "Learning structured output representation using deep conditional
generative models", as a Pyro ``model`` / ``guide`` pair: ``z ~ p(z | c)``, ``x ~ p(x | z, c)``, guide
``q(z | x, c)``.

Every network broadcasts the leading (batch) dimensions of its inputs against each other
(:class:`~pyro_vae.networks.ConcatMLP`), so vectorized particles pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.encoders import ConditionalGaussianEncoder
from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.likelihoods import build_likelihood
from pyro_vae.models.sites import Sites
from pyro_vae.networks import ConcatMLP, Shape, as_shape
from pyro_vae.priors import ConditionalNormalPrior, StandardNormal, Unconditional
from pyro_vae.validation import integer

__all__ = ["CVAE"]


class CVAE(Sites):
    """The conditional VAE (Sohn et al. 2015) as a Pyro model / guide pair.

    Model: ``z ~ p(z | c)``, ``x ~ p(x | decoder(z, c))``; guide: ``z ~ q(z | x, c)``. With the context ``c``
    the observed part of an image and ``x`` the rest, ``Predictive(cvae.model, num_samples=n)(c)`` draws
    completions.

    Args:
        data_shape: shape of the predicted part ``x``.
        context_shape: shape of the context ``c``.
        z_dim: latent dimensions.
        hidden: hidden layer sizes of the MLPs.
        likelihood: as for :class:`pyro_vae.VAE`.
        prior: ``"conditional"`` (a learned :class:`~pyro_vae.priors.ConditionalNormalPrior`), ``None``
            (``N(0, I)``), or a callable ``c -> Distribution`` of event shape ``(z_dim,)``.
        name: prefix of every site, module and the plate.

    Sites (``name=""``): plate ``"data"``; ``"z"`` ``(batch, z_dim)``; ``"x"`` ``(batch, *data_shape)``.

    Raises:
        ConfigError: a shape, ``z_dim`` or ``prior`` that is not one of the above.
    """

    def __init__(self, data_shape: Shape, context_shape: Shape, z_dim: int, *, hidden: Sequence[int] = (400,),
                 likelihood: str | dict | Callable[[torch.Tensor], dist.TorchDistribution] = "bernoulli",
                 prior: str | Callable[[torch.Tensor], dist.TorchDistribution] | None = "conditional",
                 name: str = "") -> None:
        super().__init__()
        self.data_shape, self.context_shape = as_shape(data_shape), as_shape(context_shape)
        self.z_dim = integer("z_dim", z_dim, 1)
        self.name = str(name)
        hidden = tuple(hidden)
        self.encoder = ConditionalGaussianEncoder(
            ConcatMLP([self.data_shape, self.context_shape], (2 * self.z_dim,), hidden), self.z_dim)
        self.decoder = ConcatMLP([(self.z_dim,), self.context_shape], self.data_shape, hidden)
        if prior == "conditional":
            self.prior: Callable[[torch.Tensor], dist.TorchDistribution] = ConditionalNormalPrior(
                self.context_shape, self.z_dim, hidden)
        elif prior is None:
            self.prior = Unconditional(StandardNormal(self.z_dim))
        elif callable(prior):
            self.prior = prior
        else:
            raise ConfigError(message("prior", '"conditional", None or a callable c -> Distribution',
                                      repr(prior), "pass one of those"))
        self.likelihood = build_likelihood(likelihood, self.data_shape)

    def model(self, context: torch.Tensor, x: torch.Tensor | None = None,
              num_data: int | None = None) -> torch.Tensor:
        """``p(z | c) p(x | z, c)``.

        Args:
            context: ``(batch, *context_shape)``.
            x: ``(batch, *data_shape)`` observations, or ``None`` to draw completions.
            num_data: full data-set size when the batch is a minibatch.

        Returns:
            The decoder output ``(batch, *data_shape)``.

        Raises:
            DataError: ``context`` or ``x`` of the wrong shape, or not one context per data point.
        """
        self.register_with_pyro("decoder", "prior", "likelihood")
        self.check_batch(context, "context", self.context_shape)
        if x is not None:
            self.check_batch(x, "x", self.data_shape, likelihood=True)
            if x.shape[0] != context.shape[0]:
                raise DataError(message("x", f"batch size {context.shape[0]} (the context's)", f"{x.shape[0]}",
                                        "pass one context per data point"))
        with self.plate(context.shape[0], num_data, context.device):
            z = pyro.sample(self.site("z"), self.prior(context))
            out = self.decoder(z, context)
            pyro.sample(self.site("x"), self.likelihood_dist(out), obs=x)
        return out

    def guide(self, context: torch.Tensor, x: torch.Tensor | None = None,
              num_data: int | None = None) -> torch.Tensor:
        """``q(z | x, c)``; same signature as :meth:`model`. Returns ``z`` ``(batch, z_dim)``.

        Raises:
            ConfigError: ``x`` is ``None`` (the guide encodes data).
        """
        self.register_with_pyro("encoder")
        if x is None:
            raise ConfigError(message("guide x", "the data to encode", "None",
                                      "draw completions from the model: Predictive(cvae.model, num_samples=n)(c)"))
        self.check_batch(context, "context", self.context_shape)
        self.check_batch(x, "x", self.data_shape)
        with self.plate(context.shape[0], num_data, context.device):
            return pyro.sample(self.site("z"), self.encoder.distribution(x, context))

    @torch.no_grad()
    def complete(self, context: torch.Tensor, num_samples: int = 1, mean: bool = True) -> torch.Tensor:
        """``num_samples`` completions per context, ``(num_samples, batch, *data_shape)``: ``z ~ p(z | c)``,
        then the likelihood's mean (``mean=True``) or a draw."""
        z = self.prior(context).sample((integer("num_samples", num_samples, 1),))
        px = self.likelihood_dist(self.decoder(z, context))
        return px.mean if mean else px.sample()
