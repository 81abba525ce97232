"""The measure-valued derivative of a Gaussian expectation, coupled: the mathematics.

For ``z ~ N(mu, sigma^2)`` (elementwise), the derivative of ``E f(z)`` with respect to one coordinate's
parameter is a difference of two expectations under the positive and negative parts of the derivative of the
density (Mohamed et al. 2020, "Monte Carlo Gradient Estimation in Machine Learning", JMLR, section 6; Pflug
1989; google-deepmind/mc_gradients ``measure_valued_loss``):

- ``d/dmu_j E f = 1 / (sqrt(2 pi) sigma_j) (E f(z, z_j = mu_j + sigma_j W) - E f(z, z_j = mu_j - sigma_j W))``,
  ``W ~ Weibull(scale sqrt 2, concentration 2)``;
- ``d/dsigma_j E f = 1 / sigma_j (E f(z, z_j = mu_j + sigma_j M) - E f(z, z_j = mu_j + sigma_j N))``,
  ``M`` double-sided Maxwell, ``N`` standard normal.

Coupled: the positive and negative parts share their random numbers (the same ``W`` on both sides; ``N = U M``
with ``U ~ Uniform(0, 1)``, which is standard normal), which lowers the variance. The other coordinates keep
their values from the one draw ``z``. Each coordinate of the event costs four evaluations of ``f`` (two for the
mean, two for the scale); the entries of the plates are perturbed together, since each one's cost depends only
on its own value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["sample_weibull", "sample_double_sided_maxwell", "measure_valued_normal"]


def sample_weibull(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``Weibull(scale sqrt 2, concentration 2)`` draws, ``sqrt(2) sqrt(-log U)``: the positive part of the
    derivative of ``N(0, 1)`` with respect to its mean, normalized."""
    u = torch.rand(shape, dtype=dtype, device=device).clamp_min(torch.finfo(dtype).tiny)
    return math.sqrt(2.0) * (-torch.log(u)).sqrt()


def sample_double_sided_maxwell(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard double-sided Maxwell draws (density ``x^2 exp(-x^2/2) / sqrt(2 pi)``): a random sign times the
    norm of three standard normals."""
    radius = torch.randn((*shape, 3), dtype=dtype, device=device).norm(dim=-1)
    sign = torch.where(torch.rand(shape, dtype=dtype, device=device) < 0.5, -1.0, 1.0).to(dtype)
    return sign * radius


def measure_valued_normal(cost: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor, loc: torch.Tensor,
                          scale: torch.Tensor, event_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupled measure-valued estimate ``(G_loc, G_scale)`` of the gradient of ``E cost`` with respect to
    a Normal's parameters, each of ``value``'s shape.

    Args:
        cost: ``(*value.shape) -> (*batch_shape)``, the cost of each plate entry.
        value: the draw ``z`` whose other coordinates are kept, ``(*batch_shape, *event_shape)``.
        loc, scale: the Normal's parameters, broadcastable to ``value``.
        event_dim: the site's event dimensions; each of the ``D`` event coordinates costs 4 evaluations.
    """
    mu = loc.detach().expand(value.shape)
    sigma = scale.detach().expand(value.shape)
    batch = value.shape[: value.dim() - event_dim]
    event = value.shape[value.dim() - event_dim:]
    d = event.numel()
    flat_mu, flat_sigma = mu.reshape(*batch, d), sigma.reshape(*batch, d)
    flat_z = value.detach().reshape(*batch, d)
    w = sample_weibull(flat_z.shape, value.dtype, value.device)
    m = sample_double_sided_maxwell(flat_z.shape, value.dtype, value.device)
    n = torch.rand(flat_z.shape, dtype=value.dtype, device=value.device) * m

    def at(j: int, coordinate: torch.Tensor) -> torch.Tensor:
        z = flat_z.clone()
        z[..., j] = coordinate
        return cost(z.reshape(value.shape))

    g_loc, g_scale = [], []
    for j in range(d):
        mu_j, sigma_j = flat_mu[..., j], flat_sigma[..., j]
        pos, neg = at(j, mu_j + sigma_j * w[..., j]), at(j, mu_j - sigma_j * w[..., j])
        g_loc.append((pos - neg) / (math.sqrt(2 * math.pi) * sigma_j))
        pos, neg = at(j, mu_j + sigma_j * m[..., j]), at(j, mu_j + sigma_j * n[..., j])
        g_scale.append((pos - neg) / sigma_j)
    return torch.stack(g_loc, -1).reshape(value.shape), torch.stack(g_scale, -1).reshape(value.shape)
