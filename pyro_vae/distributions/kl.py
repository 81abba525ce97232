"""Closed-form KL divergences that neither torch nor Pyro registers, registered with
``torch.distributions.kl.register_kl`` when this module is imported (``import pyro_vae`` does it).

A diagonal Gaussian written as ``Independent(Normal, 1)`` against the other Gaussian forms:
``LowRankMultivariateNormal`` (either order) and ``MultivariateNormal`` as ``q``. (``Independent(Normal)`` vs
``MultivariateNormal`` is Pyro's own; Normal vs Laplace is torch's.) The exact Bernoulli in logit space
(:class:`~pyro_vae.distributions.LogitBernoulli`) against itself: the Bernoulli's closed form (torch registers
Bernoulli vs Bernoulli and ``Independent`` vs ``Independent``, which the exact Bernoulli latent uses).
:func:`pyro_vae.infer.kl_report` says which latent sites get a closed form under ``TraceMeanField_ELBO``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)

from pyro_vae.distributions.relaxed_bernoulli import LogitBernoulli

__all__: list[str] = []


# ------------------------------------------------------------------------------------ closed forms
def _diag_normal(d: Any) -> Normal | None:
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and type(d.base_dist).__name__ == "Normal" \
            and isinstance(d.base_dist, Normal):
        return d.base_dist
    return None


def _as_lowrank(base: Normal) -> LowRankMultivariateNormal:
    loc, scale = base.loc, base.scale
    loc, scale = torch.broadcast_tensors(loc, scale)
    return LowRankMultivariateNormal(loc, torch.zeros(*loc.shape, 1, dtype=loc.dtype, device=loc.device),
                                     scale.pow(2))


@register_kl(Independent, LowRankMultivariateNormal)
def _kl_diag_normal_lowrank(p: Independent, q: LowRankMultivariateNormal) -> torch.Tensor:
    base = _diag_normal(p)
    if base is None:
        raise NotImplementedError
    return kl_divergence(_as_lowrank(base), q)


@register_kl(LowRankMultivariateNormal, Independent)
def _kl_lowrank_diag_normal(p: LowRankMultivariateNormal, q: Independent) -> torch.Tensor:
    base = _diag_normal(q)
    if base is None:
        raise NotImplementedError
    return kl_divergence(p, _as_lowrank(base))


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diag_normal(p: MultivariateNormal, q: Independent) -> torch.Tensor:
    base = _diag_normal(q)
    if base is None:
        raise NotImplementedError
    loc, scale = torch.broadcast_tensors(base.loc, base.scale)
    return kl_divergence(p, MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))


@register_kl(LogitBernoulli, LogitBernoulli)
def _kl_logit_bernoulli(p: LogitBernoulli, q: LogitBernoulli) -> torch.Tensor:
    return kl_divergence(p.bernoulli, q.bernoulli)
