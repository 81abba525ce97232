"""What a per-site gradient estimator sees of one guide site: :class:`SiteContext`.

The per-site estimators of :mod:`pyro_vae.infer.site_gradients` (and the modules it dispatches to) each compute,
for one latent guide site wrapped in :class:`~pyro_vae.infer.estimators.SiteGradient`, a term added to the
surrogate ELBO whose gradient with respect to the guide's parameters at that site is the estimator's. They get
the site, its cost as a function of its value, the model's arguments and the estimator's learned module (if any)
in one :class:`SiteContext`; this module sits below them all, so each can import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.estimators import Estimator, unwrap_independent

__all__ = ["Cost", "SiteContext", "PARTICLE_PLATE_NAME"]

#: ``cost(value) -> (*batch_shape)``: the ELBO's cost (``log p(x, z) - log q(z)``, nats) of each plate entry of a
#: guide site at ``value`` (:func:`pyro_vae.infer.site_gradients.site_cost`).
Cost = Callable[[torch.Tensor], torch.Tensor]

#: Name of the plate of vectorized particles in Pyro's ELBOs (the leave-one-out estimator's ``K`` draws).
PARTICLE_PLATE_NAME = "num_particles_vectorized"


@dataclass
class SiteContext:
    """One guide site as a per-site estimator sees it.

    Attributes:
        est: the estimator.
        name: the site's name.
        site: the guide trace's node (``site["fn"]`` is a :class:`~pyro_vae.infer.estimators.SiteGradient`,
            ``site["value"]`` the detached draw, ``(*batch_shape, *event_shape)``).
        cost: the site's cost, :data:`Cost`; differentiable in the value and in the parameters (detach what you
            keep: :meth:`detached_cost`).
        args, kwargs: the model's arguments (``args[0]`` is the data batch of a :class:`pyro_vae.VAE`).
        module: the estimator's learned part (e.g. NVIL's baseline), an extra module of the ELBO, or ``None``.
        training: whether the learned part may update its running statistics (``False`` while gradient samples
            are drawn at fixed parameters).
        relaxed_cost: the same cost without support checks (the model replayed without validation, a Bernoulli
            guide's log-density extended linearly), for values outside the support such as MuProp's mean-field
            point; ``None`` where it was not built.
    """

    est: Estimator
    name: str
    site: Any
    cost: Cost
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module: nn.Module | None = None
    training: bool = True
    relaxed_cost: Cost | None = None

    @property
    def value(self) -> torch.Tensor:
        """The site's detached draw, ``(*batch_shape, *event_shape)``."""
        return self.site["value"].detach()

    @property
    def base(self) -> torch.distributions.Distribution:
        """The guide's distribution at the site, inside the :class:`~pyro_vae.infer.estimators.SiteGradient`
        wrapper (``Independent`` wrappers kept)."""
        return self.site["fn"].base

    @property
    def family(self) -> torch.distributions.Distribution:
        """The guide's distribution without its ``Independent`` wrappers."""
        return unwrap_independent(self.base)[0]

    @property
    def event_dim(self) -> int:
        """The site's number of event dimensions."""
        return int(self.site["fn"].event_dim)

    @property
    def cost_units(self) -> float:
        """The minibatch scale of the site's plates, ``num_data / batch`` (the product of ``full_size / size``
        over its subsampled plates; 1 without subsampling): :meth:`cost` is the ELBO's cost with the data plate's
        log-densities scaled by it, and ``cost / cost_units`` is in nats per data point. A ``poutine.scale`` such
        as the VAE's KL weight is not part of it. The learned parts of NVIL, MuProp and RELAX (their baselines,
        running statistics and surrogate) work in those per-data-point units, so that what they learn does not
        depend on the batch size or ``num_data``; their terms are multiplied back by ``cost_units``."""
        units = 1.0
        for frame in self.site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size:
                units *= float(frame.full_size) / float(frame.size)
        return units if math.isfinite(units) and units > 0 else 1.0

    def detached_cost(self, value: torch.Tensor) -> torch.Tensor:
        """``cost(value)`` without gradients, ``(*batch_shape)``."""
        with torch.no_grad():
            return self.cost(value).detach()

    def particle_dim(self) -> int:
        """The dimension of the vectorized particle plate (``K >= 2`` draws of the site).

        Raises:
            ConfigError: fewer than two vectorized particles.
        """
        for frame in self.site["cond_indep_stack"]:
            if frame.name == PARTICLE_PLATE_NAME and frame.vectorized and frame.size >= 2:
                return int(frame.dim)
        raise ConfigError(message(f'estimator "{self.est.name}" at site "{self.name}"', "K >= 2 vectorized particles",
                                  "one draw", "pass num_particles=K with K >= 2"))

    def refuse(self, expected: str, fix: str) -> ConfigError:
        """The :class:`ConfigError` for a site of a family the estimator does not apply to (raise it)."""
        return ConfigError(message(f'estimator "{self.est.name}" at site "{self.name}"', expected,
                                   type(self.family).__name__, fix))
