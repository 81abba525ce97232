"""The relaxed one-hot categorical (Concrete / Gumbel-softmax) latent, carried in log space.

A Concrete draw ``y`` is a point of the simplex; at low temperature (or with peaked logits) its small entries
underflow to 0 in floating point, and no function of ``y`` can then recover its density: Pyro's
``RelaxedOneHotCategorical`` scores ``log(y)`` and gets ``-inf`` / NaN. The log of the draw, ``x = log y``
(``log_softmax((logits + Gumbel) / temperature)``), is finite at every temperature and determines the
density exactly. So a categorical latent here *is* ``x``: :class:`ExpRelaxedOneHotCategorical` (torch's
``ExpRelaxedCategorical`` with a Pyro interface) samples and scores the log-space point, and every consumer
maps it to the simplex with :func:`to_simplex` (``exp``, or its straight-through hard one-hot). The density is
a function of the value alone: a copy of the value (``expand``, ``torch.where``, ``.clone()``,
``poutine.condition``, a replayed trace, a round-trip through float64) scores exactly as the original.

:class:`ExpOneHotCategorical` is the exact categorical in the same representation (``log`` of a one-hot: 0
at the class, ``-inf`` elsewhere), which the score-function estimators use.

The log-space density is ``p(x) = (K-1)! t^(K-1) prod_k pi_k exp(-t x_k) / (sum_i pi_i exp(-t x_i))^K``
(Maddison et al. 2017, log-Concrete), with respect to Lebesgue measure in the coordinates
``x_k - x_K`` (k < K): it differs from the density of ``y = exp(x)`` on the simplex by ``sum_k x_k``, the
same for prior and guide, so ELBOs, KL estimates and importance weights are the same as on the simplex.

References:
    Maddison, Mnih, Teh (2017), The Concrete Distribution. Jang, Gu, Poole (2017), Categorical
    Reparameterization with Gumbel-Softmax.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import constraints
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical
from torch.distributions.utils import broadcast_all

from pyro_vae.pyro_internals import active_messengers
from pyro_vae.validation import positive

__all__ = ["ExpRelaxedOneHotCategorical", "ExpOneHotCategorical", "to_simplex", "log_one_hot",
           "log_class_probs", "is_log_categorical", "is_simplex_valued", "check_log_simplex", "gumbel_noise",
           "log_simplex", "log_one_hot_constraint", "check_temperature", "temperature_tensor",
           "straight_through_override"]


def check_temperature(value: float | torch.Tensor, what: str = "temperature") -> float:
    """``value`` (a real number or a 0-dim real tensor; not a string or a bool) as a float, or
    :class:`~pyro_vae.errors.ConfigError` naming ``what`` unless it is finite and > 0."""
    return positive(what, value, fix=f"pass e.g. {what}=1.0 (Jang et al. anneal from 1.0 down to 0.5)")


def temperature_tensor(temperature: float | torch.Tensor, probs: torch.Tensor | None = None,
                       logits: torch.Tensor | None = None) -> torch.Tensor:
    """A relaxed distribution's ``temperature`` as a tensor: a tensor as it is; a number as a 0-dim tensor of the
    dtype and device of ``probs`` (else of ``logits``; torch's defaults when both are ``None``)."""
    if torch.is_tensor(temperature):
        return temperature
    param = probs if probs is not None else logits
    return torch.tensor(float(temperature), dtype=param.dtype if param is not None else None,
                        device=param.device if param is not None else None)


# ------------------------------------------------------------------------------------------- support
def _tolerance(dtype: torch.dtype) -> float:
    # a point y of the simplex has logsumexp(y) >= log K + 1/K >= 1.19: any tolerance below 1 tells them apart
    return max(1e-3, 64 * torch.finfo(dtype).eps)


class _LogSimplex(constraints.Constraint):
    """The log of a point of the probability simplex: ``logsumexp(x, -1) = 0`` (entries may be ``-inf``)."""

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        lse = value.logsumexp(-1)
        return (lse.abs() <= _tolerance(value.dtype)) & ~torch.isnan(value).any(-1)


class _LogOneHot(constraints.Constraint):
    """The log of a one-hot vector: one entry 0, the others ``-inf``."""

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        zero, ninf = value == 0, value == -math.inf
        return (zero | ninf).all(-1) & (zero.sum(-1) == 1)


log_simplex = _LogSimplex()
log_one_hot_constraint = _LogOneHot()


def _describe_bad(value: torch.Tensor, ok: torch.Tensor) -> str:
    bad = value.reshape(-1, value.shape[-1])[~ok.reshape(-1)]
    first = bad[0]
    on_simplex = bool((first >= 0).all()) and abs(float(first.sum()) - 1) < 1e-3
    hint = " (a point of the simplex itself, not its log)" if on_simplex else ""
    return (f"{int((~ok).sum())} of {ok.numel()} vectors off it, e.g. {first.tolist()[:6]} with "
            f"logsumexp {float(first.logsumexp(-1)):.4g}{hint}")


def check_log_simplex(z: torch.Tensor, what: str = "z") -> None:
    """:class:`~pyro_vae.errors.DataError` unless every ``z[..., :]`` is the log of a point of the simplex
    (``logsumexp = 0``; entries ``-inf`` allowed, no NaN)."""
    from pyro_vae.errors import DataError, message

    ok = log_simplex.check(z)
    if not bool(ok.all()):
        raise DataError(message(
            what, "the log of a point of the simplex over the last dimension (logsumexp = 0): a categorical "
                  "latent is carried in log space", _describe_bad(z, ok),
            "pass log(y) for a simplex point or one-hot y, e.g. z = F.one_hot(c, k).float().log() or "
            "torch.log_softmax(logits, -1)"))


# ------------------------------------------------------------------------------------- distributions
def gumbel_noise(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))``, ``u ~ U(0, 1)`` kept away from 0 so the noise is finite."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, dtype=dtype, device=device).clamp(tiny, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(tiny))


class ExpRelaxedOneHotCategorical(ExpRelaxedCategorical, TorchDistributionMixin):
    """The relaxed one-hot categorical (Concrete) in log space: a value ``x`` is the log of a point of the
    simplex, ``x = log_softmax((logits + g) / temperature)`` with ``g`` standard Gumbel noise; ``exp(x)``
    is the usual Gumbel-softmax sample (:func:`to_simplex`).

    ``log_prob(x)`` is the log-Concrete density (Maddison et al. 2017) computed from ``x`` alone, in nats,
    shape ``batch_shape``: exact and finite for every finite ``x`` at any temperature, ``-inf`` at the
    boundary of the simplex (an entry ``-inf``, e.g. the log of a hard one-hot), where the Concrete density is
    0. Under validation a value that is not on the log-simplex (``logsumexp(x) != 0``: e.g. a point of the
    simplex passed without its log) raises :class:`~pyro_vae.errors.DataError`.

    Args:
        temperature: scalar tensor > 0.
        probs, logits: ``(..., K)`` class probabilities or unnormalized log-probabilities (one of them).

    ``probs`` / ``logits`` are the categorical it relaxes (``logits`` normalized). ``mean`` is not
    implemented (it has no closed form); :func:`log_class_probs` gives the log class probabilities.
    """

    support = log_simplex  # type: ignore[assignment]  # torch's stubs pin support to the base's constraint class

    def __init__(self, temperature: float | torch.Tensor, probs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, validate_args: bool | None = None) -> None:
        super().__init__(temperature_tensor(temperature, probs, logits), probs=probs, logits=logits,
                         validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ExpRelaxedOneHotCategorical, _instance)
        return super().expand(batch_shape, _instance=new)

    def _validate_sample(self, value: torch.Tensor) -> None:
        check_log_simplex(value, f"value of {type(self).__name__}")
        super()._validate_sample(value)

    def from_gumbel(self, gumbel: torch.Tensor) -> torch.Tensor:
        """The draw that Gumbel noise ``gumbel`` (shape ``sample_shape + batch_shape + (K,)``) determines,
        differentiable in ``logits``."""
        return torch.log_softmax((self.logits + gumbel) / self.temperature, dim=-1)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] =
                torch.Size()) -> torch.Tensor:  # noqa: B008 (torch.Size is immutable)
        shape = self._extended_shape(sample_shape)
        return self.from_gumbel(gumbel_noise(shape, self.logits.dtype, self.logits.device))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        k = value.shape[-1]
        t = self.temperature
        boundary = torch.isinf(value)
        finite = torch.where(boundary, torch.zeros((), dtype=value.dtype, device=value.device), value)
        score = logits - finite * t
        log_scale = math.lgamma(k) + (k - 1) * torch.log(t)
        lp = (score - score.logsumexp(-1, keepdim=True)).sum(-1) + log_scale
        return torch.where(boundary.any(-1), torch.full_like(lp, -math.inf), lp)


class ExpOneHotCategorical(torch.distributions.OneHotCategorical, TorchDistributionMixin):
    """The categorical itself in the log-space representation of :class:`ExpRelaxedOneHotCategorical`: a
    value is the log of a one-hot vector (0 at the class, ``-inf`` elsewhere), so ``exp`` of it is the one-hot
    and the consumers of a relaxed latent take it unchanged. ``log_prob`` is the categorical's, in nats,
    shape ``batch_shape``. Not reparameterizable (score-function estimators use it)."""

    support = log_one_hot_constraint  # type: ignore[assignment]  # torch's stubs pin support to the base's constraint class
    has_enumerate_support = True

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ExpOneHotCategorical, _instance)
        return super().expand(batch_shape, _instance=new)

    def _validate_sample(self, value: torch.Tensor) -> None:
        from pyro_vae.errors import DataError, message

        ok = log_one_hot_constraint.check(value)
        if not bool(ok.all()):
            raise DataError(message(
                f"value of {type(self).__name__}", "the log of a one-hot vector (one 0, the rest -inf)",
                _describe_bad(value, ok), "pass F.one_hot(c, k).float().log()"))
        super()._validate_sample(value)

    def from_gumbel(self, gumbel: torch.Tensor) -> torch.Tensor:
        """The Gumbel-max draw that Gumbel noise ``gumbel`` determines (not differentiable)."""
        return _log_one_hot_argmax(self.logits + gumbel)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] =
               torch.Size()) -> torch.Tensor:  # noqa: B008 (torch.Size is immutable)
        with torch.no_grad():
            return super().sample(sample_shape).log()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self._categorical.log_prob(value.max(-1)[1])

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return super().enumerate_support(expand=expand).log()

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError("the mean of a log-one-hot value is -inf; exp(log_class_probs(d)) gives "
                                  "the class probabilities")

    @property
    def variance(self) -> torch.Tensor:
        raise NotImplementedError("the variance of a log-one-hot value is not finite")


# ------------------------------------------------------------------------------------------- helpers
def _log_one_hot_argmax(t: torch.Tensor) -> torch.Tensor:
    # scatter, not F.one_hot: F.one_hot checks its input's range with .item(), which vmap refuses
    hot = torch.zeros_like(t).scatter(-1, t.argmax(-1, keepdim=True), 1.0)
    return hot.log()


def log_one_hot(index: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``log(one_hot(index, k))``: 0 at ``index``, ``-inf`` elsewhere, shape ``index.shape + (k,)``: a hard
    category in the log-space representation of a categorical latent."""
    return torch.nn.functional.one_hot(index, k).to(dtype).log()


def to_simplex(z: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """The point of the simplex a log-space latent ``z`` ``(..., K)`` stands for: ``exp(z)``, or with
    ``straight_through=True`` the one-hot of its arg-max in the forward pass with the gradient of ``exp(z)``
    in the backward pass (Bengio et al. 2013; Jang et al. 2017). Shape ``(..., K)``."""
    soft = z.exp()
    if not straight_through:
        return soft
    hard = torch.zeros_like(soft).scatter(-1, z.argmax(-1, keepdim=True), 1.0)
    return hard + (soft - soft.detach())


def _unwrap(fn: Any) -> Any:
    while True:
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        elif type(fn).__name__ in ("ExpandedDistribution", "MaskedDistribution"):
            fn = fn.base_dist
        elif type(fn).__name__ == "ScoreFunction":
            fn = fn.base
        else:
            return fn


def is_log_categorical(fn: Any) -> bool:
    """Whether ``fn`` (under ``Independent`` and Pyro's wrappers) is a categorical latent in log space:
    torch's ``ExpRelaxedCategorical`` (and so :class:`ExpRelaxedOneHotCategorical`) or
    :class:`ExpOneHotCategorical`."""
    return isinstance(_unwrap(fn), (ExpRelaxedCategorical, ExpOneHotCategorical))


def is_simplex_valued(fn: Any) -> bool:
    """Whether ``fn``'s values are points of the simplex or one-hot vectors (e.g. torch's
    ``RelaxedOneHotCategorical``, ``OneHotCategorical``, ``Dirichlet``)."""
    base = _unwrap(fn)
    if isinstance(base, (ExpRelaxedCategorical, ExpOneHotCategorical)):
        return False
    try:
        support = base.support
    except (NotImplementedError, AttributeError):
        return False
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return isinstance(support, (type(constraints.simplex), type(constraints.one_hot)))


def log_class_probs(fn: Any) -> torch.Tensor | None:
    """The normalized log class probabilities of a log-space categorical ``fn``, shape
    ``batch_shape + event_shape`` of ``fn`` (``None`` for any other distribution). ``exp`` of it is the mean
    of the categorical the Concrete relaxes (the limit of ``E[exp(x)]`` as the temperature goes to 0)."""
    base = _unwrap(fn)
    if not isinstance(base, (ExpRelaxedCategorical, ExpOneHotCategorical)):
        return None
    return base.logits.expand(tuple(fn.batch_shape) + tuple(fn.event_shape))


def straight_through_override(site: str) -> bool | None:
    """Whether an effect handler of the model that is running now asks for the straight-through estimator
    (``True``) or the plain relaxed one (``False``) at the log-space categorical latent ``site``; ``None`` when
    none does (the latent's own setting applies). A handler asks by having a method ``straight_through_at(site)``
    that returns ``True``, ``False`` or ``None`` (:class:`pyro_vae.infer.estimators.EstimatorMessenger` under
    ``make_elbo(estimator="straight-through")`` or ``"relaxed"``); the innermost one that answers wins.
    :meth:`pyro_vae.VAE.decoder_input` reads it while the model runs."""
    for handler in reversed(active_messengers()):
        ask = getattr(handler, "straight_through_at", None)
        answer = ask(site) if callable(ask) else None
        if answer is not None:
            return bool(answer)
    return None
