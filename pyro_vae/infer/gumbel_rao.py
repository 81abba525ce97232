"""Gumbel-Rao (Paulus, Maddison & Krause 2021): the straight-through Gumbel-softmax gradient of a categorical guide
site, Rao-Blackwellized over the Gumbel noise given the sampled category.

The straight-through estimator (``"straight-through"``) differentiates the cost at the relaxed draw
``y = log_softmax((theta + g) / tau)`` of the log-space categorical latent
(:class:`~pyro_vae.distributions.relaxed.ExpRelaxedOneHotCategorical`), whose decoder sees the hard one-hot of
``D = argmax y`` in the forward pass. Its estimate ``G(g)`` of the gradient with respect to the logits ``theta``
depends on the Gumbel noise ``g``; Gumbel-Rao replaces it by the mean of ``G`` over ``M`` draws ``g_m`` of the noise
*given* ``D`` (:func:`conditional_gumbel`), an estimate of ``E[G(g) | D]``:

    G_GR = (1/M) sum_m d/dtheta cost(log_softmax((theta + g_m) / tau)),   g_m ~ p(g | argmax(theta + g) = D)

with ``g_m`` held fixed (the derivative is not taken through the conditional sampler: nshepperd/gumbel-rao-pytorch
explains why the expectation is then that of straight-through). Each term is the straight-through estimate at a
noise that gives the same category, so ``E G_GR = E G_ST`` and ``Var G_GR = Var E[G | D] + E Var(G | D) / M``, no
larger than straight-through's. Both are biased estimators of the ELBO's gradient by design (the relaxation).

The cost is the ELBO's (:func:`pyro_vae.infer.site_gradients.site_cost`): the relaxed KL terms at ``y_m`` and the
likelihood at the hard one-hot with the straight-through gradient of ``exp(y_m)``, the model running under the
straight-through setting of the estimator (:func:`pyro_vae.distributions.relaxed.straight_through_override`). The
derivative is taken through the value only: the score term of ``log q`` (zero in expectation) is left out, as the
per-site estimators of :mod:`pyro_vae.infer.site_gradients` leave it out. ``M`` is the estimator's
``cv_samples`` (10 for ``"gumbel-rao"``): ``1 + M`` evaluations of the model per estimate, the draw's own and the
``M`` conditional draws' (:func:`gumbel_rao_evaluations`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical
from torch.func import grad

from pyro_vae.infer.estimators import Estimator
from pyro_vae.infer.site_context import SiteContext

__all__ = ["conditional_gumbel", "gumbel_rao_gradient", "gumbel_rao_term", "gumbel_rao_evaluations"]


def conditional_gumbel(logits: torch.Tensor, index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``num_samples`` draws of the perturbed logits ``theta + g`` (``g`` standard Gumbel, ``(..., K)``) given that
    their arg-max is ``index`` (``(...)``, integer): the maximum is Gumbel with location ``logsumexp(theta)``, the
    others are Gumbel truncated below it, ``-log(exp(-max) + exp(-theta_k) E_k)`` with ``E_k`` standard
    exponential. Shape ``(num_samples, ..., K)``; no gradient."""
    with torch.no_grad():
        shape = (num_samples, *logits.shape)
        tiny = torch.finfo(logits.dtype).tiny
        u = torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp(tiny, 1.0)
        e = -torch.log(u)  # standard exponential
        hot = torch.zeros_like(e).scatter(-1, index.unsqueeze(-1).unsqueeze(0).expand(*shape[:-1], 1), 1.0) > 0
        e_top = (e * hot).sum(-1, keepdim=True)
        top = logits.logsumexp(-1, keepdim=True) - torch.log(e_top)
        others = -torch.logaddexp(-top, torch.log(e) - logits)
        return torch.where(hot, top.expand_as(others), others)


def gumbel_rao_gradient(cost: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor, logits: torch.Tensor,
                        temperature: torch.Tensor,
                        num_samples: int) -> torch.Tensor:
    """One Gumbel-Rao estimate (module docstring) of the gradient of ``cost`` with respect to the logits of a
    log-space relaxed categorical site, ``value``'s shape ``(*batch_shape, *event_shape)`` (last dimension the
    ``K`` classes).

    Args:
        cost: ``cost(value) -> (*batch_shape)``, differentiable in the log-space value.
        value: the site's draw, whose arg-max over the last dimension is the category ``D``.
        logits: the site's logits, broadcastable to ``value`` (only their values are used).
        temperature: the relaxation's temperature.
        num_samples: ``M`` conditional draws.
    """
    theta = logits.detach().expand(value.shape)
    index = value.detach().argmax(-1)
    noise = conditional_gumbel(theta, index, num_samples) - theta

    def mean_cost(t: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=value.dtype, device=value.device)
        for m in range(num_samples):
            total = total + cost(torch.log_softmax((t + noise[m]) / temperature, dim=-1)).sum()
        return total / num_samples

    # torch.func.grad: nested in gradient_samples' vmap as well
    return grad(mean_cost)(theta).detach()


def gumbel_rao_term(ctx: SiteContext) -> torch.Tensor:
    """The term Gumbel-Rao adds to the surrogate ELBO at a log-space relaxed categorical site: ``G . theta`` for the
    guide's logits ``theta`` (``G`` detached, ``M = ctx.est.cv_samples`` conditional draws).

    Raises:
        ConfigError: a site that is not a log-space relaxed categorical.
    """
    family = ctx.family
    if not isinstance(family, ExpRelaxedCategorical):
        raise ctx.refuse("a relaxed categorical latent in log space (pyro_vae.distributions.relaxed."
                         "ExpRelaxedOneHotCategorical)", 'build the VAE with latent="categorical"')
    if not torch.is_grad_enabled():
        return torch.zeros((), dtype=ctx.value.dtype, device=ctx.value.device)
    value = ctx.value
    logits = family.logits.expand(value.shape)
    g = gumbel_rao_gradient(ctx.cost, value, logits, family.temperature.detach(), max(1, int(ctx.est.cv_samples)))
    return (g.detach() * logits).sum()


def gumbel_rao_evaluations(est: Estimator, event_size: int, values: int = 2) -> int:
    """Model evaluations per estimate: the draw's own and ``M = est.cv_samples`` conditional draws."""
    return 1 + max(1, int(est.cv_samples))
