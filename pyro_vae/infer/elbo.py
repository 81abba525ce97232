"""The ELBO factory and the ELBO of a data set.

:func:`make_elbo` is the one place an objective is built from its name (``"trace"``: ``Trace_ELBO``;
``"meanfield"``: ``TraceMeanField_ELBO``) with its particles and gradient estimator; :func:`evaluate_elbo`
averages Pyro's ELBO over a data set, in nats per data point.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import ConfigError, message
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.validation import integer

__all__ = ["ELBOS", "make_elbo", "evaluate_elbo"]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def make_elbo(elbo: Union[str, ELBO] = "trace", num_particles: int = 1, estimator: str = "pathwise",
              data_shape: Optional[Sequence[int]] = None) -> ELBO:
    """``"trace"`` (``Trace_ELBO``, Monte Carlo KL) or ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KL
    where one is registered), with ``num_particles`` vectorized particles; an ELBO object is returned as is.
    Any ``estimator`` but ``"pathwise"`` gets the ELBO of :func:`pyro_vae.estimators.make_estimator_elbo`
    (``TraceGraph_ELBO`` for baselines; ``data_shape`` sizes a neural baseline)."""
    if isinstance(elbo, ELBO):
        if estimator != "pathwise":
            raise ConfigError(message("estimator", '"pathwise" when elbo is an ELBO object', repr(estimator),
                                      'pass elbo="trace" with the estimator name'))
        return elbo
    if estimator != "pathwise":
        from pyro_vae.infer.estimators import make_estimator_elbo

        return make_estimator_elbo(estimator, elbo, num_particles, data_shape=data_shape)
    if elbo not in ELBOS:
        raise ConfigError(message("elbo", f"one of {sorted(ELBOS)} or a pyro.infer.ELBO", repr(elbo),
                                  "pick a known name"))
    num_particles = integer("num_particles", num_particles, 1)
    return ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


def evaluate_elbo(vae: VAE, data: Any, *, elbo: Union[str, ELBO] = "trace", num_particles: int = 1,
                  batch_size: int = 1024) -> float:
    """Mean ELBO per data point (nats) of ``data`` (``(N, *data_shape)``, any real dtype) under ``elbo``,
    without gradients, in batches of ``batch_size`` (an integer >= 1; :class:`ConfigError` otherwise).

    The ELBO proper, ``E_q[log p(x|z)] - KL(q(z|x) || p(z))``, whatever the VAE's KL weight ``beta`` (the
    beta-weighted training objective is ``History``'s ``train_objective``)."""
    x = vae.as_data(as_tensor_data(data, "data"), "data", data_set=True)
    batch_size = integer("batch_size", batch_size, 1)
    loss_fn = make_elbo(elbo, num_particles)
    device = vae.device
    total = 0.0
    with torch.no_grad(), unit_kl_weight(vae):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(device)
            total += loss_fn.loss(vae.model, vae.guide, xb)
    return -total / x.shape[0]
