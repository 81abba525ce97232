"""What every model of this package shares: site names, the data plate, module registration, the device and
the check of a data batch.

A model built on :class:`Sites` names each Pyro site ``key`` as ``site(key)`` (``"name/key"`` when the model has
a ``name``), so several models live in one larger Pyro model, and runs its per-data-point sites inside
:meth:`Sites.plate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.likelihoods import Likelihood

__all__ = ["Sites", "data_plate"]


def data_plate(name: str, batch: int, num_data: int | None, device: torch.device) -> pyro.plate:
    """The plate over a batch of ``batch`` data points. With ``num_data`` (the full data-set size) the plate
    has the full size and a subsample of ``batch``, so Pyro scales the log-densities by ``num_data / batch``.

    Raises:
        ConfigError: ``num_data`` is smaller than ``batch``.
    """
    if num_data is None or num_data == batch:
        return pyro.plate(name, batch, device=device)  # type: ignore[arg-type]  # Pyro types device as str only
    if num_data < batch:
        raise ConfigError(message("num_data", f"the full data-set size, >= the batch size {batch}",
                                  repr(num_data), "pass num_data=len(train_data)"))
    return pyro.plate(name, num_data, subsample=torch.arange(batch, device=device))


class Sites(nn.Module):
    """Base class of the models: site naming, the data plate, module registration, the device, the likelihood's
    distribution and the check of a data batch.

    A subclass sets ``name`` (the site prefix, ``""`` for none), ``data_shape`` (the event shape of one data
    point) and ``likelihood`` (a callable from the decoder's output to a distribution).
    """

    name: str
    data_shape: tuple[int, ...]
    likelihood: Callable[[torch.Tensor], dist.TorchDistribution]

    def site(self, name: str) -> str:
        """The Pyro site name of ``name`` (``"z"``, ``"x"``, ``"data"``, a module key): prefixed with
        ``self.name + "/"`` when the model has a name."""
        return f"{self.name}/{name}" if self.name else name

    def plate(self, batch: int, num_data: int | None, device: torch.device) -> pyro.plate:
        """The data plate (site ``site("data")``) over a batch of ``batch`` points, subsampled from ``num_data``
        when given (:func:`data_plate`)."""
        return data_plate(self.site("data"), batch, num_data, device)

    def register_with_pyro(self, *keys: str) -> None:
        """Register each part ``getattr(self, key)`` that is an ``nn.Module`` with parameters with Pyro, as
        ``pyro.module(site(key), part)``, so Pyro's optimizers and ``SVI`` train it."""
        for key in keys:
            self._register(key, getattr(self, key))

    def _register(self, key: str, module: Any) -> None:
        if isinstance(module, nn.Module) and next(module.parameters(), None) is not None:
            pyro.module(self.site(key), module)

    @property
    def device(self) -> torch.device:
        """The device of the parameters (of the buffers when there are none; the CPU when there are neither)."""
        t: torch.Tensor | None = next(self.parameters(), None)
        if t is None:
            t = next(self.buffers(), None)
        return t.device if t is not None else torch.device("cpu")

    def likelihood_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x | decoder output): the likelihood of ``out`` ``(..., *data_shape)``, with the data dimensions as
        its event shape."""
        px = self.likelihood(out)
        extra = len(self.data_shape) - len(px.event_shape)
        return px.to_event(extra) if extra > 0 else px

    def check_batch(self, t: Any, what: str, shape: tuple[int, ...], *, likelihood: bool = False) -> None:
        """Check a batch ``t`` of ``(batch, *shape)`` inputs.

        Under Pyro's validation (``pyro.enable_validation``) the values are checked too: finite and, with
        ``likelihood=True``, inside the support of the model's likelihood.

        Raises:
            DataError: ``t`` is not a tensor, not ``(batch, *shape)``, or (under validation) has non-finite
                values or values outside the likelihood's support; the message names ``what``.
        """
        if not torch.is_tensor(t):
            raise DataError(message(what, "a torch.Tensor", type(t).__name__, "convert with torch.as_tensor"))
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise DataError(message(what, f"shape (batch, {', '.join(map(str, shape))})", f"shape {tuple(t.shape)}",
                                    "reshape the data to (batch, *shape)"))
        if is_validation_enabled():
            if not bool(torch.isfinite(t).all()):
                raise DataError(message(what, "finite values", "NaN or infinite values", "drop or impute them"))
            if likelihood and isinstance(self.likelihood, Likelihood):
                self.likelihood.check_data(t, what)
