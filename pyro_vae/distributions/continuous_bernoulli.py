"""The continuous Bernoulli distribution, exact and stable for every real logit.

The continuous Bernoulli with logit ``eta`` (Loaiza-Ganem & Cunningham 2019) has the density on ``[0, 1]``

    p(x | eta) = eta * exp(eta * x) / expm1(eta),        p(x | 0) = 1,
    log p(x | eta) = x * eta - K(eta),   K(eta) = log(expm1(eta) / eta) = eta / 2 + log(sinh(eta / 2) / (eta / 2)),

an exponential family with natural parameter ``eta`` and log-partition ``K``; its mean is ``K'(eta)`` and its
variance ``K''(eta)``. torch's ``ContinuousBernoulli`` clamps the probability ``sigmoid(eta)`` to
``[eps, 1 - eps]`` in the normalizer, the mean and the sampler but not in the ``x * eta`` term, so beyond
``|eta| ~ 16`` in float32 (``~ 36`` in float64) its "density" no longer integrates to 1 (at ``eta = -50`` it
integrates to 0.32 and its mean is 0.063 instead of 0.020). :class:`StableContinuousBernoulli` computes every
quantity from ``eta`` directly: a power series (Bernoulli numbers) for ``|eta| < 1``, and forms built on
``log(-expm1(-|eta|))`` elsewhere, which neither overflow nor cancel. Gradients are finite everywhere
(each branch sees only arguments that are valid for it).

Reference: Loaiza-Ganem, Cunningham (2019), The continuous Bernoulli: fixing a pervasive error in
variational autoencoders, NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

__all__ = [
    "StableContinuousBernoulli",
    "cb_log_partition",
    "cb_mean",
    "cb_variance",
]

# |eta| below this uses the power series; above, the closed forms (which lose at most ~12 ulps at 1).
_SERIES_BELOW = 1.0

# Bernoulli numbers B_2 ... B_24. The series (radius of convergence 2 pi) converge like (eta / 2 pi)^(2n):
# twelve terms reach float64 rounding at |eta| = 1.
_B2N = [Fraction(1, 6), Fraction(-1, 30), Fraction(1, 42), Fraction(-1, 30), Fraction(5, 66),
        Fraction(-691, 2730), Fraction(7, 6), Fraction(-3617, 510), Fraction(43867, 798),
        Fraction(-174611, 330), Fraction(854513, 138), Fraction(-236364091, 2730)]
# log(sinh(h) / h) with h = eta / 2:  sum_n B_2n eta^2n / (2n (2n)!)
_L_COEF = [float(b / (2 * n * math.factorial(2 * n))) for n, b in enumerate(_B2N, 1)]
# K'(eta) - 1/2:  sum_n B_2n eta^(2n-1) / (2n)!
_M_COEF = [float(b / math.factorial(2 * n)) for n, b in enumerate(_B2N, 1)]
# K''(eta):  sum_n B_2n (2n-1) eta^(2n-2) / (2n)!
_V_COEF = [float(b * (2 * n - 1) / math.factorial(2 * n)) for n, b in enumerate(_B2N, 1)]


def _horner(coef: list[float], s: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(s, coef[-1])
    for c in reversed(coef[:-1]):
        out = out * s + c
    return out


def _split(eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(small, eta_small, eta_large)``: the mask of the series region, and ``eta`` with the other region's
    entries replaced by a harmless value (so neither branch, nor its gradient, ever sees a bad argument)."""
    small = eta.abs() < _SERIES_BELOW
    return small, torch.where(small, eta, torch.zeros_like(eta)), torch.where(small, torch.ones_like(eta), eta)


def _log_sinhc_half(eta: torch.Tensor) -> torch.Tensor:
    """``L(eta) = log(sinh(eta / 2) / (eta / 2))``, even in ``eta``, ``L(0) = 0``."""
    small, es, el = _split(eta)
    series = es * es * _horner(_L_COEF, es * es)
    a = el.abs()
    closed = 0.5 * a + torch.log(-torch.expm1(-a)) - torch.log(a)
    return torch.where(small, series, closed)


def cb_log_partition(eta: torch.Tensor) -> torch.Tensor:
    """``K(eta) = log((exp(eta) - 1) / eta)`` (``0`` at ``eta = 0``), elementwise: the log-partition of the
    continuous Bernoulli, ``log p(x | eta) = x * eta - K(eta)``. Nats; exact and overflow-free for every real
    ``eta`` in float32 and float64."""
    small, es, el = _split(eta)
    series = 0.5 * es + es * es * _horner(_L_COEF, es * es)
    a = el.abs()
    # max(eta, 0) + log(1 - exp(-|eta|)) - log|eta|: no two large terms cancel for negative eta
    closed = el.clamp(min=0) + torch.log(-torch.expm1(-a)) - torch.log(a)
    return torch.where(small, series, closed)


def cb_mean(eta: torch.Tensor) -> torch.Tensor:
    """``E[x] = K'(eta) = 1 / (1 - exp(-eta)) - 1 / eta`` (``1/2`` at ``eta = 0``), elementwise."""
    small, es, el = _split(eta)
    series = 0.5 + es * _horner(_M_COEF, es * es)
    a = el.abs()
    below_half = 1.0 / a + torch.exp(-a) / torch.expm1(-a)  # the mean at -|eta|
    return torch.where(small, series, torch.where(el > 0, 1.0 - below_half, below_half))


def cb_variance(eta: torch.Tensor) -> torch.Tensor:
    """``Var[x] = K''(eta) = 1 / eta^2 - exp(-|eta|) / expm1(-|eta|)^2`` (``1/12`` at ``eta = 0``),
    elementwise."""
    small, es, el = _split(eta)
    series = _horner(_V_COEF, es * es)
    a = el.abs()
    closed = a.reciprocal().square() - torch.exp(-a) / torch.expm1(-a).square()
    return torch.where(small, series, closed)


def _sign_branches(eta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(near0, pos, eta_pos, eta_neg, eta_0)`` for the CDF and its inverse: the masks of ``|eta|`` below
    :func:`_tiny` and of ``eta`` above it, and ``eta`` on each branch with the others' entries replaced by a
    harmless value (so no branch, nor its gradient, sees a bad argument)."""
    tiny = _tiny(eta)
    near0 = eta.abs() < tiny
    pos = eta >= tiny
    ep = torch.where(pos, eta, torch.ones_like(eta))
    en = torch.where(eta <= -tiny, eta, -torch.ones_like(eta))
    e0 = torch.where(near0, eta, torch.zeros_like(eta))
    return near0, pos, ep, en, e0


class _FiniteReal(constraints.Constraint):
    """Finite real numbers (an infinite logit is a point mass, which has no density)."""

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(value)

    def __repr__(self) -> str:
        return "FiniteReal()"


class StableContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's ``ContinuousBernoulli`` with every quantity computed exactly from the logit.

    Args:
        probs: ``lambda`` in ``(0, 1)``, any batch shape (``logits = log(lambda / (1 - lambda))``); as in
            torch, ``probs`` is clamped to ``[eps, 1 - eps]`` on entry, so pass ``logits`` for parameters
            beyond ``|logit| ~ 16`` (float32).
        logits: ``eta``, finite reals, any batch shape (pass one of the two).
        lims: accepted for compatibility with torch's signature and ignored.
        validate_args: as for any torch distribution.

    Event shape ``()``; batch shape that of the parameter. ``log_prob(x)`` (nats per entry) is
    ``x * eta - log(expm1(eta) / eta)``, ``x`` in ``[0, 1]``; ``mean``, ``variance``, ``entropy``, ``cdf``,
    ``icdf`` and the reparameterized ``rsample`` (inverse CDF ``log1p(u * expm1(eta)) / eta``) are exact
    and finite, with finite gradients, for every finite ``eta``, including ``0`` and ``|eta|`` in the
    hundreds. With validation on, an infinite or NaN logit raises ``ValueError`` naming ``logits``.
    ``probs`` keeps torch's meaning: the parameter ``lambda = sigmoid(eta)``, not the mean.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "probs": constraints.unit_interval, "logits": _FiniteReal()}

    def _new_uniform(self, sample_shape: Sequence[int]) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        return torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)

    # ----------------------------------------------------------------------------- moments, normalizer
    @property
    def mean(self) -> torch.Tensor:
        return cb_mean(self.logits)

    @property
    def variance(self) -> torch.Tensor:
        return cb_variance(self.logits)

    def _cont_bern_log_norm(self) -> torch.Tensor:
        # log C(lambda) of p(x) = C(lambda) lambda^x (1 - lambda)^(1 - x) = log(eta / tanh(eta / 2))
        return F.softplus(self.logits) - cb_log_partition(self.logits)

    def _log_normalizer(self, x: torch.Tensor) -> torch.Tensor:
        return cb_log_partition(x)

    def entropy(self) -> torch.Tensor:
        eta = self.logits
        small, es, el = _split(eta)
        series = cb_log_partition(es) - cb_mean(es) * es
        a = el.abs()
        # K(eta) - eta E[x], even in eta, with the two terms that grow like |eta| cancelled analytically
        closed = 1.0 - torch.log(a) + torch.log(-torch.expm1(-a)) + a * torch.exp(-a) / torch.expm1(-a)
        return torch.where(small, series, closed)

    # ----------------------------------------------------------------------------------------- density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        eta, x = broadcast_all(self.logits, value)
        small, es, el = _split(eta)
        # |eta| < 1: (x - 1/2) eta - L(eta), which keeps full relative accuracy near x = 1/2 and eta = 0.
        series = (x - 0.5) * es - es * es * _horner(_L_COEF, es * es)
        # otherwise: x eta - max(eta, 0) + log|eta| - log(1 - exp(-|eta|)), each term bounded.
        a = el.abs()
        linear = torch.where(el > 0, (x - 1.0) * el, x * el)
        closed = linear + torch.log(a) - torch.log(-torch.expm1(-a))
        return torch.where(small, series, closed)

    # --------------------------------------------------------------------------------- CDF and sampling
    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        eta, x = broadcast_all(self.logits, value)
        x = x.clamp(0.0, 1.0)
        near0, pos, ep, en, e0 = _sign_branches(eta)
        # (e^(eta x) - 1) / (e^eta - 1), written without e^eta for eta > 0
        f_pos = torch.exp(ep * (x - 1.0)) * torch.expm1(-ep * x) / torch.expm1(-ep)
        f_neg = torch.expm1(en * x) / torch.expm1(en)
        f_0 = x + e0 * x * (x - 1.0) / 2 + e0 * e0 * x * (x - 1.0) * (2 * x - 1.0) / 12
        return torch.where(near0, f_0, torch.where(pos, f_pos, f_neg)).clamp(0.0, 1.0)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        eta, u = broadcast_all(self.logits, value)
        near0, pos, ep, en, e0 = _sign_branches(eta)
        # log1p(u expm1(eta)) / eta; for eta > 0 as softplus(log u + log expm1(eta)) / eta (no overflow)
        log_expm1 = ep + torch.log(-torch.expm1(-ep))
        x_pos = F.softplus(torch.log(u) + log_expm1) / ep
        x_neg = torch.log1p(u * torch.expm1(en)) / en
        x_0 = u + e0 * u * (1.0 - u) / 2 + e0 * e0 * u * (1.0 - u) * (1.0 - 2 * u) / 6
        return torch.where(near0, x_0, torch.where(pos, x_pos, x_neg)).clamp(0.0, 1.0)

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        return self.icdf(self._new_uniform(sample_shape))

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


def _tiny(eta: torch.Tensor) -> float:
    # below sqrt(eps) the second-order series of the CDF and its inverse is exact to rounding
    return math.sqrt(torch.finfo(eta.dtype).eps)


@register_kl(StableContinuousBernoulli, StableContinuousBernoulli)
def _kl_stable_cb(p: StableContinuousBernoulli, q: StableContinuousBernoulli) -> torch.Tensor:
    # KL = E_p[log p - log q] = E_p[x] (eta_p - eta_q) - K(eta_p) + K(eta_q). Mirroring x -> 1 - x negates both
    # logits and leaves the KL unchanged: with eta_p <= 0 no term grows like eta_p, so nothing large cancels.
    eta_p, eta_q = broadcast_all(p.logits, q.logits)
    sign = torch.where(eta_p > 0, -torch.ones_like(eta_p), torch.ones_like(eta_p))
    eta_p, eta_q = sign * eta_p, sign * eta_q
    return cb_mean(eta_p) * (eta_p - eta_q) - cb_log_partition(eta_p) + cb_log_partition(eta_q)
