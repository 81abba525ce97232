"""The relaxed Bernoulli (binary Concrete) latent, carried in logit space, and the exact Bernoulli in the same
representation.

A binary Concrete draw ``y = sigmoid(x)``, ``x = (logits + L) / temperature`` with ``L`` standard logistic
noise, saturates to exactly 0 or 1 in floating point once ``|x|`` passes about 17 (float32): no function of
``y`` then recovers its density. The logit ``x`` itself is finite and determines the density exactly, so a
relaxed Bernoulli latent here *is* ``x`` (:class:`LogitRelaxedBernoulli`, Maddison et al. 2017, the
"BinConcrete" in logit space), and every consumer maps it to the unit interval with :func:`to_unit`
(``sigmoid``, or the straight-through hard threshold). :class:`LogitBernoulli` is the exact Bernoulli in that
representation (``+inf`` for 1, ``-inf`` for 0, the limit of the relaxed draw as the temperature goes to 0),
which the score-function estimators use on a relaxed latent, as
:class:`~pyro_vae.distributions.ExpOneHotCategorical` for a categorical one.

The density of ``x`` is ``t exp(logits - t x) / (1 + exp(logits - t x))^2`` with respect to Lebesgue
measure; it differs from the density of ``y = sigmoid(x)`` by ``log y (1 - y)``, the same for prior and
guide, so ELBOs, KL estimates and importance weights equal those on the unit interval.

A plain :class:`pyro.distributions.Bernoulli` latent (values in ``{0, 1}``) is the exact latent of
``pyro_vae.VAE(latent="bernoulli")``; this module is its relaxed variant.

References:
    Maddison, Mnih, Teh (2017), The Concrete Distribution. Jang, Gu, Poole (2017), Categorical
    Reparameterization with Gumbel-Softmax.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution, TorchDistributionMixin
from torch.distributions import constraints
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli as TorchLogitRelaxedBernoulli
from torch.distributions.utils import broadcast_all

from pyro_vae.distributions.relaxed import temperature_tensor

__all__ = ["LogitRelaxedBernoulli", "LogitBernoulli", "to_unit", "logistic_noise", "is_bernoulli",
           "is_relaxed_bernoulli", "is_logit_bernoulli", "bernoulli_logits", "logit_boolean", "unwrap_distribution"]


class _LogitBoolean(constraints.Constraint):
    """``-inf`` or ``+inf``: the logit of a value in ``{0, 1}``."""

    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return torch.isinf(value)


logit_boolean = _LogitBoolean()


def logistic_noise(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard logistic noise ``log u - log(1 - u)``, ``u ~ U(0, 1)`` kept inside (0, 1) so it is finite."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, dtype=dtype, device=device).clamp(tiny, 1.0 - torch.finfo(dtype).eps)
    return u.log() - torch.log1p(-u)


class LogitRelaxedBernoulli(TorchLogitRelaxedBernoulli, TorchDistributionMixin):
    """The relaxed Bernoulli (binary Concrete) in logit space: a value ``x`` is the logit of the relaxed draw,
    ``x = (logits + L) / temperature`` with ``L`` standard logistic noise; ``sigmoid(x)`` is the usual relaxed
    Bernoulli sample (:func:`to_unit`).

    ``log_prob(x)`` is the log density of ``x`` in nats, shape ``batch_shape``: computed with ``softplus``, so
    it is exact and finite for every finite ``x`` at any temperature (torch's own overflows to ``-inf`` once
    ``logits - t x`` passes about 88), and ``-inf`` at ``x = +-inf`` (the logit of a hard 0 or 1).

    Args:
        temperature: scalar > 0 (a float or a tensor).
        probs, logits: ``(...)`` probabilities of a 1, or their logits (one of them).
    """

    has_rsample = True  # torch's LogitRelaxedBernoulli has rsample but leaves has_rsample False

    def __init__(self, temperature: float | torch.Tensor, probs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, validate_args: bool | None = None) -> None:
        super().__init__(temperature_tensor(temperature, probs, logits), probs=probs, logits=logits,
                         validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogitRelaxedBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)

    def from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The draw that standard logistic noise ``noise`` (shape ``sample_shape + batch_shape``) determines,
        ``(logits + noise) / temperature``, differentiable in ``logits``."""
        return (self.logits + noise) / self.temperature

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """The draw that uniform noise ``u`` in (0, 1) determines (its logistic noise ``log u - log(1 - u)``, ``u``
        kept inside the open interval), differentiable in ``logits``."""
        u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
        return self.from_noise(u.log() - torch.log1p(-u))

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] =
                torch.Size()) -> torch.Tensor:  # noqa: B008 (torch.Size is immutable)
        shape = self._extended_shape(sample_shape)
        return self.from_noise(logistic_noise(shape, self.logits.dtype, self.logits.device))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        boundary = torch.isinf(value)
        finite = torch.where(boundary, torch.zeros((), dtype=value.dtype, device=value.device), value)
        diff = logits - finite * self.temperature
        lp = self.temperature.log() + diff - 2 * F.softplus(diff)
        return torch.where(boundary, torch.full_like(lp, -math.inf), lp)


class LogitBernoulli(TorchDistribution):
    """The exact Bernoulli in the logit-space representation of :class:`LogitRelaxedBernoulli`: a value is the
    logit of a hard draw, ``+inf`` for 1 and ``-inf`` for 0, so ``sigmoid`` of it is the draw and the consumers
    of a relaxed latent take it unchanged. ``log_prob`` is the Bernoulli's, in nats, shape ``batch_shape``. Not
    reparameterizable (the score-function estimators use it). ``kl_divergence`` between two of them is the
    Bernoulli's closed form (registered in :mod:`pyro_vae.distributions.kl`).

    Args:
        probs, logits: ``(...)`` probabilities of a 1, or their logits (one of them).
    """

    arg_constraints = {"logits": constraints.real}
    support = logit_boolean
    has_enumerate_support = True
    has_rsample = False

    def __init__(self, probs: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 validate_args: bool | None = None) -> None:
        self.bernoulli = torch.distributions.Bernoulli(probs=probs, logits=logits, validate_args=False)
        super().__init__(self.bernoulli.batch_shape, validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        """Logits of a 1, shape ``batch_shape``."""
        return self.bernoulli.logits

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities of a 1, shape ``batch_shape``."""
        return self.bernoulli.probs

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogitBernoulli, _instance)
        new.bernoulli = self.bernoulli.expand(torch.Size(batch_shape))
        super(LogitBernoulli, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @staticmethod
    def _to_logit(b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, math.inf, -math.inf).to(b.dtype)

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """The draw that uniform noise ``u`` in (0, 1) determines: ``+inf`` where ``u < probs``, else ``-inf``
        (not differentiable)."""
        return self._to_logit((u < self.probs).to(self.logits.dtype))

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] =
               torch.Size()) -> torch.Tensor:  # noqa: B008 (torch.Size is immutable)
        with torch.no_grad():
            return self._to_logit(self.bernoulli.sample(torch.Size(sample_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.bernoulli.log_prob((value > 0).to(self.logits.dtype))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self._to_logit(self.bernoulli.enumerate_support(expand=expand))

    def entropy(self) -> torch.Tensor:
        return self.bernoulli.entropy()

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError("the mean of a logit-space value is not finite; sigmoid(logits) gives the "
                                  "probabilities")

    @property
    def variance(self) -> torch.Tensor:
        raise NotImplementedError("the variance of a logit-space value is not finite")


def to_unit(z: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """The point of ``[0, 1]`` a logit-space latent ``z`` stands for: ``sigmoid(z)``, or with
    ``straight_through=True`` its hard threshold ``z > 0`` in the forward pass with the gradient of
    ``sigmoid(z)`` in the backward pass (Bengio et al. 2013). Same shape as ``z``."""
    soft = torch.sigmoid(z)
    if not straight_through:
        return soft
    hard = (z > 0).to(soft.dtype)
    return hard + (soft - soft.detach())


def unwrap_distribution(fn: Any) -> Any:
    """The distribution inside ``Independent``, Pyro's ``Expanded`` / ``Masked`` wrappers and the estimators'
    wrappers (anything with a distribution ``base``)."""
    while True:
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        elif type(fn).__name__ in ("ExpandedDistribution", "MaskedDistribution"):
            fn = fn.base_dist
        elif hasattr(fn, "base") and isinstance(fn.base, torch.distributions.Distribution):
            fn = fn.base  # the estimators' wrappers (ScoreFunction, SiteGradient, PathGradient)
        else:
            return fn


def is_bernoulli(fn: Any) -> bool:
    """Whether ``fn`` (under ``Independent`` and Pyro's or the estimators' wrappers) is an exact Bernoulli with
    values in ``{0, 1}`` (torch's or Pyro's ``Bernoulli``)."""
    return isinstance(unwrap_distribution(fn), torch.distributions.Bernoulli)


def is_relaxed_bernoulli(fn: Any) -> bool:
    """Whether ``fn`` (under ``Independent`` and wrappers) is a relaxed Bernoulli in logit space (torch's
    ``LogitRelaxedBernoulli``, so :class:`LogitRelaxedBernoulli`)."""
    return isinstance(unwrap_distribution(fn), TorchLogitRelaxedBernoulli)


def is_logit_bernoulli(fn: Any) -> bool:
    """Whether ``fn`` (under ``Independent`` and wrappers) is a Bernoulli latent in logit space: relaxed
    (:class:`LogitRelaxedBernoulli`) or exact (:class:`LogitBernoulli`)."""
    return isinstance(unwrap_distribution(fn), (TorchLogitRelaxedBernoulli, LogitBernoulli))


def bernoulli_logits(fn: Any) -> torch.Tensor | None:
    """The logits of a 1 of a Bernoulli-family ``fn`` (exact or relaxed, any representation), shape
    ``batch_shape + event_shape`` of ``fn``; ``None`` for any other distribution."""
    base = unwrap_distribution(fn)
    if not isinstance(base, (torch.distributions.Bernoulli, TorchLogitRelaxedBernoulli, LogitBernoulli)):
        return None
    return base.logits.expand(tuple(fn.batch_shape) + tuple(fn.event_shape))

