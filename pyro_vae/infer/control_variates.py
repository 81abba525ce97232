"""Control variates for the score-function (REINFORCE) gradient of one guide site: the mathematics.

Each function takes the site's cost as a callable, ``cost(value) -> (*batch_shape)``: the downstream cost of
one value of the site per entry of its plates (for the ELBO, ``log p(x, z) - log q(z)`` summed to the site's
plates, as :mod:`pyro_vae.infer.site_gradients` builds it), and returns what the estimator needs. Every
estimate is unbiased: a baseline or coefficient is computed from draws independent of the draw it is applied
to, or its expectation is added back in closed form.

- :func:`mean_baseline`: ``b = (1/M) sum_m cost(z'_m)``, ``z'_m ~ q`` independent of ``z``; the estimate
  ``(cost(z) - b) d log q(z)`` (Williams 1992; the baseline ``E cost`` of Mohamed et al. 2020, section 7).
- :func:`optimal_coefficients`: for a Normal ``q``, the variance-optimal constant baseline per parameter
  ``c* = Cov(cost s, s) / Var(s) = E[cost s^2] / I`` (``s`` the score of that parameter, ``E s = 0``, ``I``
  its Fisher information, known in closed form: ``1/sigma^2`` for the mean, ``2/sigma^2`` for the scale),
  estimated by ``(1/M) sum_m cost(z'_m) s(z'_m)^2 / I`` on ``M`` independent draws (Mohamed et al. 2020,
  section 7.4; google-deepmind/mc_gradients ``compute_control_variate_coeff`` also resamples).
- :func:`delta_method`: the second-order Taylor expansion of the cost at the mean, ``f~(z) = f(mu) +
  g.(z - mu) + 1/2 (z - mu)' H (z - mu)``, whose expectation under ``N(mu, diag sigma^2)`` is ``f(mu) +
  1/2 sum_j H_jj sigma_j^2``; the estimate ``(f(z) - f~(z)) s + grad E f~`` (Paisley et al. 2012; Mohamed
  et al. 2020, section 7.2; mc_gradients ``control_delta_method``).
- :func:`leave_one_out_baseline`: for ``K >= 2`` draws, each one's baseline is the mean cost of the other
  ``K - 1`` (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; google-research disarm
  ``reinforce_loo``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp

__all__ = ["normal_scores", "normal_fisher_information", "mean_baseline", "optimal_coefficients",
           "delta_method", "leave_one_out_baseline"]

Cost = Callable[[torch.Tensor], torch.Tensor]


def normal_scores(value: torch.Tensor, loc: torch.Tensor,
                  scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d/dloc, d/dscale) log N(value; loc, scale^2)`` elementwise: ``((z - mu) / sigma^2,
    ((z - mu)^2 / sigma^2 - 1) / sigma)``, in the broadcast shape of the three arguments."""
    u = (value - loc) / scale
    return u / scale, (u.pow(2) - 1) / scale


def normal_fisher_information(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher information of a Normal's ``(loc, scale)`` elementwise: ``(1/sigma^2, 2/sigma^2)``."""
    inv = scale.pow(-2)
    return inv, 2 * inv


def _event_expand(batch_value: torch.Tensor, event_dim: int) -> torch.Tensor:
    return batch_value.reshape(batch_value.shape + (1,) * event_dim)


def mean_baseline(cost: Cost, draw: Callable[[], torch.Tensor], num_draws: int) -> torch.Tensor:
    """``(1/M) sum_m cost(draw())`` over ``M = num_draws`` independent draws of the site, ``(*batch_shape)``."""
    total = None
    for _ in range(num_draws):
        c = cost(draw())
        total = c if total is None else total + c
    assert total is not None
    return total / num_draws


def optimal_coefficients(cost: Cost, loc: torch.Tensor, scale: torch.Tensor, shape: torch.Size, event_dim: int,
                         num_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated variance-optimal baselines ``(c_loc, c_scale)`` of a Normal site, each of the value's shape
    ``shape`` (one per parameter element): ``(1/M) sum_m cost(z'_m) s(z'_m)^2 / I`` over ``M = num_draws``
    draws ``z'_m = loc + scale eps_m``, independent of the draw the coefficients are applied to.

    Args:
        cost: the site's cost, ``(*shape) -> (*shape[:len(shape) - event_dim])``.
        loc, scale: the Normal's parameters (broadcastable to ``shape``), detached.
        shape: the shape of one value of the site.
        event_dim: the site's event dimensions.
        num_draws: ``M``.
    """
    info_loc, info_scale = normal_fisher_information(scale)
    acc_loc = acc_scale = None
    for _ in range(num_draws):
        z = loc + scale * torch.randn(shape, dtype=loc.dtype, device=loc.device)
        c = _event_expand(cost(z), event_dim)
        s_loc, s_scale = normal_scores(z, loc, scale)
        a, b = c * s_loc.pow(2), c * s_scale.pow(2)
        acc_loc = a if acc_loc is None else acc_loc + a
        acc_scale = b if acc_scale is None else acc_scale + b
    assert acc_loc is not None and acc_scale is not None
    return acc_loc / (num_draws * info_loc), acc_scale / (num_draws * info_scale)


def delta_method(cost: Cost, value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 event_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-draw estimate ``(G_loc, G_scale)`` of the gradient of ``E cost`` with respect to a Normal's
    parameters, each of ``value``'s shape, with the delta-method control variate expanded at the mean:
    ``G = (f(z) - f~(z)) s(z) + (g, diag(H) sigma)`` where ``g`` and ``H`` (per plate entry, over the event's
    ``D`` coordinates) are the gradient and Hessian of the cost at ``z = mu``, computed with ``torch.func``
    (one gradient and ``D`` Hessian-vector products; the cost must be twice differentiable in the value).

    The expansion point is held fixed (``mu`` detached): the control variate is then a fixed quadratic whose
    expectation's gradient is ``(g, diag(H) sigma)``, so the estimate is unbiased.
    """
    mu = loc.detach().expand(value.shape).clone()  # forward-mode AD needs its own memory, not a broadcast view
    sigma = scale.detach().expand(value.shape)

    def total(z: torch.Tensor) -> torch.Tensor:
        return cost(z).sum()

    g_fn = grad(total)
    g = g_fn(mu)
    event = value.shape[value.dim() - event_dim:]
    d = event.numel()
    batch = value.shape[: value.dim() - event_dim]
    h_cols = []
    for j in range(d):
        e = torch.zeros(d, dtype=mu.dtype, device=mu.device)
        e[j] = 1.0
        direction = e.reshape(event).expand(value.shape).clone()
        h_cols.append(jvp(g_fn, (mu,), (direction,))[1].reshape(*batch, d))
    hess = torch.stack(h_cols, -1)  # (*batch, D, D): column j is H e_j
    dz = (value - mu).reshape(*batch, d)
    quad = 0.5 * (dz.unsqueeze(-2) @ hess @ dz.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    approx = cost(mu) + (g.reshape(*batch, d) * dz).sum(-1) + quad
    residual = _event_expand(cost(value) - approx, event_dim)
    s_loc, s_scale = normal_scores(value, mu, sigma)
    diag = torch.diagonal(hess, dim1=-2, dim2=-1).reshape(value.shape)
    return residual * s_loc + g, residual * s_scale + diag * sigma


def leave_one_out_baseline(costs: torch.Tensor, dim: int) -> torch.Tensor:
    """Each draw's baseline, the mean cost of the other ``K - 1`` draws along ``dim`` (``K >= 2``):
    ``(sum - cost_k) / (K - 1)``, in ``costs``' shape."""
    k = costs.shape[dim]
    return (costs.sum(dim, keepdim=True) - costs) / (k - 1)
