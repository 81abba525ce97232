"""The base of the guide-site wrappers that change how a gradient estimator treats a site without changing the
distribution: :class:`pyro_vae.infer.estimators.ScoreFunction`, :class:`~pyro_vae.infer.estimators.SiteGradient`
and :class:`pyro_vae.infer.path_gradient.PathGradient`."""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

__all__ = ["Wrapped"]


class Wrapped(TorchDistribution):
    """A distribution that is ``base`` for everything but its gradient: ``log_prob``, ``support``, ``mean``,
    ``variance``, ``entropy`` and ``enumerate_support`` are those of ``base`` (same batch and event shapes);
    ``expand`` and ``to_event`` keep the wrapper, so the site works inside plates and with event dimensions.
    Subclasses decide ``sample``/``rsample`` and ``score_parts``, i.e. what Pyro's ELBOs differentiate.

    Args:
        base: the distribution wrapped.
    """

    arg_constraints: dict = {}

    def __init__(self, base: Any) -> None:
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def rewrap(self, base: Any) -> Wrapped:
        """The same wrapper around another ``base`` (what ``expand`` returns)."""
        return type(self)(base)

    @constraints.dependent_property
    def support(self):
        return self.base.support

    @property
    def has_enumerate_support(self) -> bool:  # type: ignore[override]
        return self.base.has_enumerate_support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)

    def expand(self, batch_shape, _instance=None) -> Wrapped:
        return self.rewrap(self.base.expand(torch.Size(batch_shape)))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base.enumerate_support(expand=expand)

    @property
    def mean(self) -> torch.Tensor:
        return self.base.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base.variance

    def entropy(self) -> torch.Tensor:
        return self.base.entropy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"
