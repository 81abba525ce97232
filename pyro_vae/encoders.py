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

from .errors import ShapeError, message

__all__ = ["Encoder", "GaussianEncoder"]


class Encoder(nn.Module):
    """Base class: a guide distribution computed from data."""

    def distribution(self, x: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., z_dim)``."""
        h = self.net(x)
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

    def distribution(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self(x)
        return dist.Normal(loc, scale).to_event(1)

    def config(self) -> dict[str, Any]:
        return {"latent": "gaussian", "min_scale": self.min_scale}
