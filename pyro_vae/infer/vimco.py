"""VIMCO (Mnih & Rezende 2016): the multi-sample score-function gradient of the importance-weighted bound for guide
sites without ``rsample`` (Bernoulli, categorical): the mathematics.

With ``K`` draws ``z_1..z_K ~ q(z | x)`` and log weights ``log w_k = log p(x, z_k) - log q(z_k | x)``, the bound's
estimate ``L = log (1/K) sum_k w_k`` depends on the guide's parameters through the draws and through ``log q``.
Its gradient is

    sum_k (L - L_{-k}) d log q(z_k) + sum_k w~_k d log w_k,     w~ = softmax(log w)

where the second sum is the gradient of ``L`` at fixed draws (what the bound's own surrogate gives) and ``L_{-k}``
is the leave-one-out baseline of draw ``k``: ``L`` with ``w_k`` replaced by the geometric mean of the others,
``exp(1/(K-1) sum_{j != k} log w_j)``. ``L_{-k}`` does not depend on ``z_k``, so the estimate stays unbiased; the
learning signal ``L - L_{-k}`` is local to the draw. For Renyi's bound of order ``alpha``
(:mod:`pyro_vae.infer.iwae`) the same construction applies to ``(1 - alpha) log w``. Reference code:
google-research disarm (``vimco``); TensorFlow Probability ``csiszar_divergence.csiszar_vimco``.

Pyro's ``RenyiELBO`` (1.9) has no learning-signal term for such sites; :class:`pyro_vae.infer.iwae.
ImportanceWeightedELBO` with ``estimator="vimco"`` adds it (``make_elbo("iwae", K, "vimco")``, ``K >= 2``).
"""

from __future__ import annotations

import math

import torch

from pyro_vae.infer.control_variates import leave_one_out_baseline

__all__ = ["leave_one_out_bounds", "vimco_learning_signals"]


def leave_one_out_bounds(log_w: torch.Tensor, dim: int, alpha: float = 0.0) -> torch.Tensor:
    """``L_{-k}`` for each draw ``k`` along ``dim`` (``K >= 2``): the bound ``1/(1 - alpha) log (1/K) sum_j
    w_j^(1 - alpha)`` with draw ``k``'s term replaced by the geometric mean of the others' terms; ``log_w``'s shape."""
    a = 1.0 - alpha
    s = (a * log_w).movedim(dim, -1)
    k = s.shape[-1]
    substitute = leave_one_out_baseline(s, -1)  # the geometric mean of the others' terms, in log space
    eye = torch.eye(k, dtype=torch.bool, device=s.device)
    rows = torch.where(eye, substitute.unsqueeze(-1), s.unsqueeze(-2))  # row k: draw k replaced
    out = (rows.logsumexp(-1) - math.log(k)) / a
    return out.movedim(-1, dim)


def vimco_learning_signals(log_w: torch.Tensor, dim: int, alpha: float = 0.0) -> torch.Tensor:
    """The detached learning signals ``L - L_{-k}`` of VIMCO, one per draw along ``dim``, ``log_w``'s shape."""
    log_w = log_w.detach()
    a = 1.0 - alpha
    bound = ((a * log_w).logsumexp(dim, keepdim=True) - math.log(log_w.shape[dim])) / a
    return bound - leave_one_out_bounds(log_w, dim, alpha)
