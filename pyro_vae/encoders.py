"""Amortized guide distributions q(z | x): a network plus the distribution it parameterizes.

An encoder here is an ``nn.Module`` with ``distribution(x)`` returning a Pyro distribution of batch shape
``x.shape[:-len(data_shape)]``; :class:`pyro_vae.VAE` samples the latent site from it.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.errors import ShapeError, message
from pyro_vae.validation import integer

__all__ = ["Encoder", "GaussianEncoder", "RelaxedCategoricalEncoder", "ConditionalGaussianEncoder",
           "CategoricalEncoder", "BernoulliEncoder"]


class Encoder(nn.Module):
    """Base class: a guide distribution computed from data."""

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """``q(z | x)`` for data ``x`` of shape ``(..., *data_shape)``: a Pyro distribution of batch shape
        ``(...)`` and the latent's event shape (``(z_dim,)``; ``(n, k)`` for a categorical latent). An encoder
        of a VAE built with ``encoder_context`` also takes those values as keyword arguments
        (``distribution(x, **context)``), as the built-in ones do, passing them on to the network.

        Raises:
            NotImplementedError: in the base class; every encoder implements it.
        """
        raise NotImplementedError


class GaussianEncoder(Encoder):
    """Diagonal Gaussian ``N(loc, diag(scale^2))`` from a network whose last output dimension is
    ``2 * z_dim``: the first half is the mean, the second a pre-softplus scale,
    ``scale = softplus(raw) + min_scale``. Softplus grows linearly, so large outputs cannot overflow
    as ``exp`` of a log-scale can, and ``min_scale`` keeps ``log q`` finite."""

    def __init__(self, net: nn.Module, z_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.net = net
        self.z_dim = int(z_dim)
        self.min_scale = float(min_scale)

    def forward(self, x: torch.Tensor, **context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., z_dim)``, from ``net(x, **context)``."""
        h = self.net(x, **context)
        if h.shape[-1] != 2 * self.z_dim:
            raise ShapeError(
                message(
                    "encoder network output",
                    f"last dimension 2 * z_dim = {2 * self.z_dim} (mean and scale)",
                    f"shape {tuple(h.shape)}",
                    f"make the encoder network end in {2 * self.z_dim} features",
                )
            )
        loc, raw = h.split(self.z_dim, dim=-1)
        return loc, F.softplus(raw) + self.min_scale

    def distribution(self, x: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        loc, scale = self(x, **context)
        return dist.Normal(loc, scale).to_event(1)

    def config(self) -> dict[str, Any]:
        """The encoder's settings, JSON-able: ``{"latent": "gaussian", "min_scale": ...}``."""
        return {"latent": "gaussian", "min_scale": self.min_scale}


class _TemperedLogitsEncoder(Encoder):
    """Base of the encoders whose network gives logits and whose relaxed distribution has a ``temperature``
    (validated on every set). Subclasses set ``net`` and ``_temperature`` in ``__init__``."""

    net: nn.Module
    _temperature: float

    @property
    def temperature(self) -> float:
        """Relaxation temperature (> 0) of the relaxed distribution; setting it validates the value."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        from pyro_vae.distributions.relaxed import check_temperature

        self._temperature = check_temperature(value)

    def _logits(self, x: torch.Tensor, width: int, expected: str, **context: Any) -> torch.Tensor:
        """``net(x, **context)``, checked to end in ``width`` features (``expected`` says which, for the error).

        Raises:
            ShapeError: the network's last output dimension is not ``width``.
        """
        h = self.net(x, **context)
        if h.shape[-1] != width:
            raise ShapeError(message("encoder network output", f"last dimension {expected} (the logits)",
                                     f"shape {tuple(h.shape)}", f"make the encoder network end in {width} features"))
        return h

    def _temperature_like(self, logits: torch.Tensor) -> torch.Tensor:
        """The temperature as a scalar tensor of ``logits``' dtype and device."""
        return torch.tensor(self._temperature, dtype=logits.dtype, device=logits.device)


class RelaxedCategoricalEncoder(_TemperedLogitsEncoder):
    """Relaxed one-hot categorical guide (Gumbel-softmax / Concrete; Jang et al. 2017, Maddison et al.
    2017) over ``n`` independent categorical variables of ``k`` classes, event shape ``(n, k)``.

    The network maps ``(..., *data_shape)`` to ``(..., n * k)`` logits. ``temperature`` is a plain
    attribute, so a schedule (:class:`pyro_vae.schedules.ExponentialTemperature`) can anneal it during
    training. The distribution is :class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical`: its values are
    the *log* of the relaxed one-hot sample (finite at any temperature, and its density a function of the
    value alone); :meth:`pyro_vae.VAE.decoder_input` maps them to the simplex. ``straight_through=True``
    makes the VAE's decoder see the hard one-hot of each draw with the relaxed draw's gradient; the
    latent and its densities are the same either way.

    There is no closed-form KL divergence between two Concrete distributions, so under
    ``TraceMeanField_ELBO`` this site falls back to the Monte Carlo estimate ``log q(z|x) - log p(z)``
    (:func:`pyro_vae.kl_report` shows it).
    """

    def __init__(self, net: nn.Module, n: int, k: int, temperature: float = 1.0,
                 straight_through: bool = False) -> None:
        super().__init__()
        from pyro_vae.distributions.relaxed import check_temperature

        self.net = net
        self.n, self.k = int(n), int(k)
        self._temperature = check_temperature(temperature)
        self.straight_through = bool(straight_through)

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        """Normalized logits ``(..., n, k)`` from ``net(x, **context)``."""
        h = self._logits(x, self.n * self.k, f"n * k = {self.n} * {self.k} = {self.n * self.k}", **context)
        return torch.log_softmax(h.reshape(*h.shape[:-1], self.n, self.k), dim=-1)

    def distribution(self, x: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        """``q(z | x)``: :class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical` at the current temperature,
        batch shape ``x``'s batch dimensions, event shape ``(n, k)``, values in log space."""
        from pyro_vae.distributions.relaxed import ExpRelaxedOneHotCategorical

        logits = self(x, **context)
        return ExpRelaxedOneHotCategorical(self._temperature_like(logits), logits=logits).to_event(1)

    def config(self) -> dict[str, Any]:
        """The encoder's settings, JSON-able: ``{"latent": "categorical", "categories": k, "temperature": ...,
        "straight_through": ...}`` (the current temperature)."""
        return {"latent": "categorical", "categories": self.k, "temperature": self._temperature,
                "straight_through": self.straight_through}


class BernoulliEncoder(_TemperedLogitsEncoder):
    """Factorized Bernoulli guide over ``z_dim`` binary variables, event shape ``(z_dim,)``: the sigmoid belief
    net layer of the discrete-estimator papers (Mnih & Gregor 2014; Tucker et al. 2017; Grathwohl et al. 2018;
    Yin & Zhou 2019; Dong et al. 2020).

    The network maps ``(..., *data_shape)`` to ``(..., z_dim)`` logits of a 1. With ``relaxed=False`` the
    distribution is ``Bernoulli(logits=...).to_event(1)``, values in ``{0, 1}`` (not reparameterizable: Pyro's
    ELBOs use the score function). With ``relaxed=True`` it is the binary Concrete
    (:class:`~pyro_vae.distributions.LogitRelaxedBernoulli`, Maddison et al. 2017) at ``temperature``, whose
    values are the *logits* of the relaxed draw (finite at any temperature, the density a function of the value
    alone): :meth:`pyro_vae.VAE.decoder_input` maps them to ``sigmoid(z)``, or with ``straight_through=True`` to
    the hard ``z > 0`` in the forward pass with the relaxed gradient.

    ``temperature`` is a plain attribute, so a schedule (:class:`pyro_vae.schedules.ExponentialTemperature`)
    anneals it; it is unused when ``relaxed=False``. Under ``TraceMeanField_ELBO`` the exact guide gets the
    closed-form Bernoulli KL against a Bernoulli prior; the relaxed one falls back to Monte Carlo.

    Raises:
        ShapeError: (``forward``) the network's last output dimension is not ``z_dim``.
    """

    def __init__(self, net: nn.Module, z_dim: int, relaxed: bool = False, temperature: float = 1.0,
                 straight_through: bool = False) -> None:
        super().__init__()
        from pyro_vae.distributions.relaxed import check_temperature

        self.net = net
        self.z_dim = integer("z_dim", z_dim, 1)
        self.relaxed = bool(relaxed) or bool(straight_through)
        self._temperature = check_temperature(temperature)
        self.straight_through = bool(straight_through)

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        """Logits of a 1, ``(..., z_dim)``, from ``net(x, **context)``."""
        return self._logits(x, self.z_dim, f"z_dim = {self.z_dim}", **context)

    def distribution(self, x: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        """``q(z | x)``: batch shape ``x``'s batch dimensions, event shape ``(z_dim,)``; ``Bernoulli`` (values in
        ``{0, 1}``) or, relaxed, :class:`~pyro_vae.distributions.LogitRelaxedBernoulli` (logit-space values)."""
        logits = self(x, **context)
        if not self.relaxed:
            return dist.Bernoulli(logits=logits).to_event(1)
        from pyro_vae.distributions.relaxed_bernoulli import LogitRelaxedBernoulli

        return LogitRelaxedBernoulli(self._temperature_like(logits), logits=logits).to_event(1)

    def config(self) -> dict[str, Any]:
        """The encoder's settings, JSON-able: ``{"latent": "bernoulli", "relaxed": ..., "temperature": ...,
        "straight_through": ...}`` (the current temperature)."""
        return {"latent": "bernoulli", "relaxed": self.relaxed, "temperature": self._temperature,
                "straight_through": self.straight_through}


class ConditionalGaussianEncoder(Encoder):
    """``q(z | x, c) = N(loc, diag(scale^2))`` from a network of ``(x, *context)`` (e.g. a
    :class:`~pyro_vae.networks.ConcatMLP`) whose last output dimension is ``2 * z_dim``: the mean, then a
    pre-softplus scale, ``scale = softplus(raw) + min_scale``, as :class:`GaussianEncoder`.

    Raises:
        ShapeError: (``forward``) the network's last output dimension is not ``2 * z_dim``.
    """

    def __init__(self, net: nn.Module, z_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.net = net
        self.z_dim = integer("z_dim", z_dim, 1)
        self.min_scale = float(min_scale)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., z_dim)``."""
        h = self.net(x, *context)
        if h.shape[-1] != 2 * self.z_dim:
            raise ShapeError(message("encoder network output", f"last dimension 2 * z_dim = {2 * self.z_dim}",
                                     f"shape {tuple(h.shape)}",
                                     f"make the encoder network end in {2 * self.z_dim} features"))
        loc, raw = h.split(self.z_dim, dim=-1)
        return loc, F.softplus(raw) + self.min_scale

    def distribution(self, x: torch.Tensor, *context: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x, c)``: batch shape the broadcast batch dimensions of the inputs, event shape ``(z_dim,)``."""
        loc, scale = self(x, *context)
        return dist.Normal(loc, scale).to_event(1)


class CategoricalEncoder(Encoder):
    """``q(y | x) = Categorical(logits=net(x))`` for a network ending in ``num_classes`` features (the
    classifier of the semi-supervised model, :class:`pyro_vae.SSVAE`).

    Raises:
        ShapeError: (``forward``) the network's last output dimension is not ``num_classes``.
    """

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = integer("num_classes", num_classes, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., num_classes)``."""
        logits = self.net(x)
        if logits.shape[-1] != self.num_classes:
            raise ShapeError(message("classifier output", f"last dimension num_classes = {self.num_classes}",
                                     f"shape {tuple(logits.shape)}", "make the network end in num_classes features"))
        return logits

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(y | x)``: batch shape ``x``'s batch dimensions, integer values in ``0 .. num_classes - 1``."""
        return dist.Categorical(logits=self(x))
