"""The ELBO factory and the ELBO of a data set.

:func:`make_elbo` is the one place an objective is built: from its name (``"trace"``: ``Trace_ELBO``;
``"meanfield"``: ``TraceMeanField_ELBO``), its particles and its gradient estimator (the ELBO classes of
:mod:`pyro_vae.infer.estimators`); :func:`make_estimator_elbo` is the same factory with the estimator first.
:func:`evaluate_elbo` averages Pyro's ELBO over a data set, in nats per data point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.estimators import (
    ESTIMATORS,
    Estimator,
    EstimatorTrace_ELBO,
    EstimatorTraceGraph_ELBO,
    EstimatorTraceMeanField_ELBO,
    NeuralBaseline,
    get_estimator,
)
from pyro_vae.infer.site_gradients import SiteGradientTrace_ELBO, SiteGradientTraceMeanField_ELBO
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.validation import integer

__all__ = ["ELBOS", "make_elbo", "make_estimator_elbo", "check_elbo", "evaluate_elbo"]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def check_elbo(elbo: Any, estimator: str | Estimator = "pathwise") -> Estimator:
    """The :class:`~pyro_vae.infer.estimators.Estimator` of ``estimator`` when it can go with the ELBO named
    ``elbo`` (a key of :data:`ELBOS`).

    Raises:
        ConfigError: an unknown estimator or ELBO name, or ``"meanfield"`` with a score-function estimator
            (Pyro's ``TraceMeanField_ELBO`` drops the score-function term of the reconstruction).
    """
    est = get_estimator(estimator)
    if not isinstance(elbo, str) or elbo not in ELBOS:
        raise ConfigError(message("elbo", " or ".join(f'"{name}"' for name in ELBOS), repr(elbo),
                                  'pass elbo="trace"'))
    if elbo == "meanfield" and est.score_function:
        raise ConfigError(message(
            f'elbo with estimator "{est.name}"', '"trace" (Monte Carlo KL)', '"meanfield"',
            "TraceMeanField_ELBO drops the score-function term of the reconstruction; use elbo=\"trace\""))
    return est


def make_elbo(elbo: str | ELBO = "trace", num_particles: int = 1,
              estimator: str | Estimator = "pathwise", data_shape: Sequence[int] | None = None, *,
              baseline_beta: float = 0.9, nn_baseline: nn.Module | None = None,
              max_plate_nesting: int = 1) -> ELBO:
    """The Pyro ELBO that computes ``estimator``'s gradient of the ELBO on an unchanged model/guide pair.

    The pathwise estimator changes no site, so it gets Pyro's own class: ``Trace_ELBO`` (Monte Carlo KL) for
    ``"trace"``, ``TraceMeanField_ELBO`` (analytic KL where one is registered) for ``"meanfield"``. Any other
    estimator gets the class of :mod:`pyro_vae.infer.estimators` that applies it: ``EstimatorTraceGraph_ELBO``
    (Pyro's ``TraceGraph_ELBO``) for the baseline estimators, else ``EstimatorTrace_ELBO`` or
    ``EstimatorTraceMeanField_ELBO``. The particles are vectorized. An ELBO object is returned as is.

    Args:
        elbo: ``"trace"``, ``"meanfield"`` or a ``pyro.infer.ELBO`` object (pathwise estimator only).
        num_particles: particles per estimate, an integer >= 1.
        estimator: a name of :data:`~pyro_vae.infer.estimators.ESTIMATORS` or an ``Estimator``.
        data_shape: shape of one data point; sizes the neural baseline of ``"score-function-neural-baseline"``.
        baseline_beta: decay of the average baseline of ``"score-function-baseline"``.
        nn_baseline: your own baseline module for ``"score-function-neural-baseline"`` (default: a
            :class:`~pyro_vae.infer.estimators.NeuralBaseline` for ``data_shape``).
        max_plate_nesting: plates in the model (1 for a :class:`pyro_vae.VAE`).

    Raises:
        ConfigError: as :func:`check_elbo`; ``num_particles`` not an integer >= 1; an ELBO object with an
            estimator other than pathwise; the neural baseline without ``data_shape`` or ``nn_baseline``.
    """
    if isinstance(elbo, ELBO):
        if get_estimator(estimator) != ESTIMATORS["pathwise"]:
            raise ConfigError(message("estimator", '"pathwise" when elbo is an ELBO object', repr(estimator),
                                      'pass elbo="trace" with the estimator name'))
        return elbo
    num_particles = integer("num_particles", num_particles, 1)
    est = check_elbo(elbo, estimator)
    kwargs: dict[str, Any] = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                  max_plate_nesting=max_plate_nesting)
    if est == ESTIMATORS["pathwise"]:
        return ELBOS[elbo](**kwargs)  # type: ignore[index]
    if est.baseline == "neural" and nn_baseline is None:
        if data_shape is None:
            raise ConfigError(message("data_shape", "the shape of one data point for the neural baseline", "None",
                                      "pass data_shape=vae.data_shape or nn_baseline=module"))
        nn_baseline = NeuralBaseline(data_shape)
    kwargs.update(estimator=est, baseline_beta=baseline_beta,
                  nn_baseline=nn_baseline if est.baseline == "neural" else None)
    if est.site_gradient is not None:
        return _site_gradient_elbo(elbo, est, kwargs)
    if est.baseline is not None:
        return EstimatorTraceGraph_ELBO(**kwargs)
    if elbo == "meanfield":
        return EstimatorTraceMeanField_ELBO(**kwargs)
    return EstimatorTrace_ELBO(**kwargs)


def _site_gradient_elbo(elbo: str, est: Estimator, kwargs: dict[str, Any]) -> ELBO:
    """The ELBO of a per-site estimator (:mod:`pyro_vae.infer.site_gradients`); ``rloo`` needs ``K >= 2``
    particles."""
    if est.site_gradient == "rloo" and kwargs["num_particles"] < 2:
        raise ConfigError(message(f'num_particles with estimator "{est.name}"',
                                  "K >= 2 draws (each is baselined by the mean of the others)",
                                  str(kwargs["num_particles"]), "pass num_particles=K with K >= 2"))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("baseline_beta", "nn_baseline")}
    cls = SiteGradientTraceMeanField_ELBO if elbo == "meanfield" else SiteGradientTrace_ELBO
    return cls(**kwargs)


def make_estimator_elbo(estimator: str | Estimator = "pathwise", elbo: str | ELBO = "trace",
                        num_particles: int = 1, *, data_shape: Sequence[int] | None = None,
                        baseline_beta: float = 0.9, nn_baseline: nn.Module | None = None,
                        max_plate_nesting: int = 1) -> ELBO:
    """An alias of :func:`make_elbo` with the estimator as first argument: ``make_estimator_elbo(estimator,
    elbo, num_particles, ...)`` is ``make_elbo(elbo, num_particles, estimator, ...)``, same ELBO, same errors."""
    return make_elbo(elbo, num_particles, estimator, data_shape, baseline_beta=baseline_beta,
                     nn_baseline=nn_baseline, max_plate_nesting=max_plate_nesting)


def evaluate_elbo(vae: VAE, data: Any, *, elbo: str | ELBO = "trace", num_particles: int = 1,
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
