"""Priors p(z): callables with no arguments returning a Pyro distribution of event shape ``(z_dim,)``.

Any such callable works; an ``nn.Module`` prior is registered with Pyro by the model, so its parameters
learn with the rest of the VAE.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import pyro.distributions as dist
import torch
from torch import nn

from .errors import ConfigError, message

__all__ = ["StandardNormal", "PRIORS", "build_prior"]

PriorFn = Callable[[], dist.Distribution]


class StandardNormal(nn.Module):
    """``N(0, I)`` over ``z_dim`` dimensions; buffers follow the module across devices."""

    name = "normal"

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(int(z_dim)))
        self.register_buffer("scale", torch.ones(int(z_dim)))

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


PRIORS: dict[str, Callable[..., nn.Module]] = {"normal": StandardNormal}


def build_prior(spec: Union[str, dict, PriorFn, None], z_dim: int) -> PriorFn:
    """A prior from a name, a config dict (``{"name": ..., **options}``) or a callable (returned as is)."""
    if spec is None:
        spec = "normal"
    if callable(spec):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if spec not in PRIORS:
        raise ConfigError(
            message(
                "prior",
                "one of " + ", ".join(sorted(PRIORS)) + " or a callable returning a distribution",
                repr(spec),
                "pick one of the known names or pass your own callable",
            )
        )
    return PRIORS[spec](z_dim, **kwargs)
