"""Imputation of missing entries with a trained VAE.

A boolean ``mask`` marks the observed entries (``True`` = observed, as Pyro's ``obs_mask``). The model
scores only observed entries: the likelihood's entry-wise log-densities are masked before they are summed,
so missing entries never enter a weight. Three methods:

- ``"importance"`` (the default): self-normalized importance sampling of
  ``E[x_mis | x_obs] = E_{p(z | x_obs)} E[x_mis | z]`` with the guide evaluated at the initial completion
  as the proposal and weights ``p(z) p(x_obs | z) / q(z | x)``, read off Pyro traces of the model and the
  guide. It targets the exact conditional mean as ``num_samples`` grows.
- ``"metropolis"``: Metropolis-within-Gibbs (Mattei & Frellsen 2018, "Leveraging the Exact Likelihood of
  Deep Latent Variable Models", Alg. 1): propose ``z' ~ q(z | x_obs, x_mis)``, accept with the ratio of
  importance weights ``p(x, z') q(z | x) / (p(x, z) q(z' | x))``, then draw ``x_mis ~ p(x_mis | z)``: a Markov
  chain whose stationary distribution is the exact ``p(z, x_mis | x_obs)``. The imputation is the average of
  ``E[x_mis | z]`` over the second half of the chain.
- ``"gibbs"``: pseudo-Gibbs sampling (Rezende et al. 2014, "Stochastic Backpropagation and Approximate
  Inference in Deep Generative Models", Sec. 5): alternate ``z ~ q(z | x_obs, x_mis)`` and
  ``x_mis <- E[x_mis | z]``, averaging ``E[x_mis | z]`` over the second half of the chain.

Pseudo-Gibbs is an exact Gibbs sampler only when the encoder is the exact posterior. Otherwise the observed
entries enter only through the encoder and the chain can drift away from them as it runs (Mattei &
Frellsen 2018); on a small digits model its error grows with the number of iterations, while the importance
estimate beats it.

:func:`impute` takes the model's named context as keyword arguments (see :meth:`pyro_vae.VAE.model`): a tensor whose
first dimension has ``N`` rows (one per data point of ``x``) is per data point and split with ``x`` into batches;
every other value is global. The model, the guide and the decoder of every method see it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.generation import posterior_samples
from pyro_vae.infer.traces import particle_chunks, particle_log_probs, particle_plate_dim
from pyro_vae.models.context import context_rows, is_per_point
from pyro_vae.models.vae import VAE
from pyro_vae.validation import integer

__all__ = ["impute", "make_mask", "masked_error", "METHODS", "MASKS"]

METHODS = ("importance", "metropolis", "gibbs")
MASKS = ("top", "bottom", "left", "right", "random:P")


def make_mask(data_shape: Sequence[int], kind: str = "bottom", n: int = 1, *, seed: int = 0) -> torch.Tensor:
    """An observed-entries mask ``(n, *data_shape)`` (``True`` = observed) that hides part of each point.

    Args:
        kind: ``"top"``, ``"bottom"``, ``"left"`` or ``"right"`` hides that half of an image (``(C, H, W)``,
            ``(H, W)`` or a square flat vector; for other vectors, the first/last half of the entries);
            ``"random:P"`` hides each entry with probability ``P`` (seeded).
    """
    shape = tuple(int(s) for s in data_shape)
    n = integer("n", n)
    if kind.startswith("random:"):
        try:
            p = float(kind.split(":", 1)[1])
        except ValueError:
            p = math.nan
        if not 0 < p <= 1:  # P = 0 hides nothing: there would be nothing to impute or to score
            raise ConfigError(message("mask", "random:P with 0 < P <= 1", repr(kind), "pass e.g. random:0.5"))
        g = torch.Generator().manual_seed(seed)
        return torch.rand((n, *shape), generator=g) >= p
    if kind not in ("top", "bottom", "left", "right"):
        raise ConfigError(message("mask", f"one of {MASKS} or a .npy/.pt file of booleans", repr(kind),
                                  "pass e.g. --mask bottom"))
    size = math.prod(shape)
    side = math.isqrt(size)
    if len(shape) >= 2:
        h, w = shape[-2], shape[-1]
    elif side * side == size:
        h, w = side, side
    else:
        h, w = 1, size
    rows = torch.arange(h).reshape(h, 1).expand(h, w)
    cols = torch.arange(w).reshape(1, w).expand(h, w)
    if h == 1 and kind in ("top", "bottom"):
        hidden = cols < w // 2 if kind == "top" else cols >= w // 2
    else:
        hidden = {"top": rows < h // 2, "bottom": rows >= h // 2,
                  "left": cols < w // 2, "right": cols >= w // 2}[kind]
    return (~hidden).expand(*shape[:-2], h, w).reshape(shape).expand(n, *shape).clone()


def _check_mask(vae: VAE, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise DataError(message("mask", "a boolean tensor (True = observed)",
                                f"{type(mask).__name__}" + (f" of dtype {mask.dtype}" if torch.is_tensor(mask) else ""),
                                "pass mask = torch.as_tensor(array, dtype=torch.bool)"))
    try:
        return mask.expand_as(x)
    except RuntimeError:
        raise DataError(message("mask", f"shape data_shape {vae.data_shape} or the data's {tuple(x.shape)}",
                                f"shape {tuple(mask.shape)}", "build it with pyro_vae.imputation.make_mask")) from None


def _default_init(vae: VAE, num_samples: int = 512, **context: Any) -> torch.Tensor:
    """The model's marginal mean ``E_p[x]`` (given global context), estimated from ``num_samples`` prior draws."""
    return vae.sample(num_samples, mean=True, **context).mean(0)


def _default_init_given(vae: VAE, batch: int, context: dict[str, Any], num_samples: int = 64) -> torch.Tensor:
    """The model's marginal mean given the context, ``E_p[x | context]`` per data point ``(batch, *data_shape)``,
    estimated from ``num_samples`` prior draws per point."""
    total = torch.zeros(batch, *vae.data_shape, device=vae.device)
    for _ in range(num_samples):
        total += vae.sample(batch, mean=True, **context)
    return total / num_samples


def impute(vae: VAE, x: torch.Tensor, mask: torch.Tensor, *, method: str = "importance", num_iters: int = 10,
           num_samples: int = 500, init: torch.Tensor | None = None, batch_size: int = 256,
           seed: int | None = None, **context: Any) -> torch.Tensor:
    """Fill the missing entries of ``x``.

    Args:
        vae: a trained VAE whose likelihood factorizes over entries.
        x: ``(N, *data_shape)``; missing entries may hold anything, NaN included.
        mask: boolean, ``True`` where observed; shape ``data_shape`` or ``(N, *data_shape)``.
        method: ``"importance"``, ``"metropolis"`` or ``"gibbs"`` (see the module docstring).
        num_iters: chain length (``"gibbs"``, ``"metropolis"``; the first half is burn-in).
        num_samples: importance samples per point (``"importance"``).
        init: starting values of the missing entries, ``data_shape`` (default: the model's marginal mean, given
            the global context; with per-data-point context, its mean given each point's, from 64 prior draws per
            point).
        batch_size: data points per batch.
        seed: seeds Pyro first.
        context: the model's named context: per data point ``(N, ...)`` (split into batches with ``x``) or global.

    Returns:
        ``(N, *data_shape)`` on ``x``'s device: observed entries unchanged, missing ones imputed.

    Raises:
        DataError: a per-data-point context value whose first dimension is not ``N``
            (:meth:`pyro_vae.VAE.check_context_rows`).
    """
    if method not in METHODS:
        raise ConfigError(message("method", f"one of {METHODS}", repr(method), 'pass method="importance"'))
    num_iters = integer("num_iters", num_iters)
    num_samples = integer("num_samples", num_samples)
    batch_size = integer("batch_size", batch_size)
    if not torch.is_tensor(x) or x.dim() < 1 or tuple(x.shape[1:]) != vae.data_shape:
        vae.check_data(x, "x")
    mask = _check_mask(vae, x, mask)
    x_obs = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    vae.check_data(x_obs, "x (observed entries)")
    vae.check_context_rows(x.shape[0], context)
    if seed is not None:
        pyro.set_rng_seed(seed)
    device = vae.device
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            if init is not None:
                start: torch.Tensor | None = torch.as_tensor(init, dtype=x.dtype).to(device)
            else:
                per_point = any(is_per_point(v, x.shape[0]) for v in context.values())
                start = None if per_point else _default_init(vae, **context)
            out = []
            for i in range(0, x.shape[0], batch_size):
                xb, mb = x_obs[i: i + batch_size].to(device), mask[i: i + batch_size].to(device)
                rows = context_rows(context, x.shape[0], slice(i, i + batch_size))
                first = _default_init_given(vae, xb.shape[0], rows) if start is None else start.expand_as(xb)
                filled = torch.where(mb, xb, first)
                if method == "importance":
                    filled = _importance(vae, xb, mb, filled, num_samples, rows)
                elif method == "metropolis":
                    filled = _metropolis(vae, xb, mb, filled, num_iters, rows)
                else:
                    filled = _gibbs(vae, xb, mb, filled, num_iters, rows)
                out.append(filled.to(x.device))
    finally:
        vae.train(was_training)
    return torch.cat(out)


def _gibbs(vae: VAE, x: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor, num_iters: int,
           context: dict[str, Any]) -> torch.Tensor:
    total = torch.zeros_like(filled)
    count = 0
    # Imputed entries are likelihood means (grey levels even under a Bernoulli likelihood): they feed the
    # encoder but are never scored, so the support check of the guide is switched off here.
    with pyro.validation_enabled(False):
        for t in range(num_iters):
            x_mean = vae.decode(posterior_samples(vae, filled, **context), mean=True, **context)
            filled = torch.where(mask, x, x_mean)
            if t >= num_iters // 2:
                total += x_mean
                count += 1
    return torch.where(mask, x, total / count)


def _metropolis(vae: VAE, x: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor, num_iters: int,
                context: dict[str, Any]) -> torch.Tensor:
    site = vae.site("z")
    total = torch.zeros_like(filled)
    count = 0
    model, guide = _with_context(vae, context)
    with pyro.validation_enabled(False):
        particle_dim = particle_plate_dim(model, guide, filled)
        z = posterior_samples(vae, filled, **context).unsqueeze(0)  # (1, B, *latent_event_shape)
        for t in range(num_iters):
            proposal = particle_log_probs(vae, model, guide, filled, 1, particle_dim, keep=("z",))
            data = {site: z}
            current = particle_log_probs(vae, poutine.condition(model, data=data),
                                         poutine.condition(guide, data=data), filled, 1, particle_dim)
            log_rho = (proposal.log_w - current.log_w)[0]  # (B,)
            accept = torch.rand_like(log_rho).log() < log_rho
            shape = (1, -1, *([1] * (z.dim() - 2)))
            assert proposal.z is not None  # kept
            z = torch.where(accept.reshape(shape), proposal.z, z)
            px = vae.decode_dist(z[0], **context)  # p(x | z) as the model defines it, for any latent type
            filled = torch.where(mask, x, px.sample())
            if t >= num_iters // 2:
                total += px.mean
                count += 1
    return torch.where(mask, x, total / count)


def _with_context(vae: VAE, context: dict[str, Any]) -> tuple[Any, Any]:
    """``vae.model`` and ``vae.guide`` with the context bound (themselves without context)."""
    if not context:
        return vae.model, vae.guide
    return functools.partial(vae.model, **context), functools.partial(vae.guide, **context)


def _importance(vae: VAE, x: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor, num_samples: int,
                context: dict[str, Any]) -> torch.Tensor:
    model, guide = _with_context(vae, context)
    with pyro.validation_enabled(False):
        particle_dim = particle_plate_dim(model, guide, filled)
        log_norm = torch.full((x.shape[0],), -math.inf, device=x.device)
        acc = torch.zeros_like(filled)
        for out in particle_chunks(vae, model, guide, filled, num_samples, particle_dim, obs_mask=mask,
                                   keep=("x_mean",)):
            lw, xm = out.log_w, out.x_mean  # (k, B), (k, B, *data_shape)
            assert xm is not None  # kept
            new_norm = torch.logaddexp(log_norm, lw.logsumexp(0))
            w = (lw - new_norm).exp().reshape(*lw.shape, *([1] * len(vae.data_shape)))
            acc = acc * (log_norm - new_norm).exp().reshape(-1, *([1] * len(vae.data_shape))) + (w * xm).sum(0)
            log_norm = new_norm
    return torch.where(mask, x, acc)


def masked_error(x_true: torch.Tensor, x_imputed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-point mean squared error over the missing entries (``mask == False``), ``(N,)``."""
    mask = mask.expand_as(x_true)
    missing = (~mask).reshape(mask.shape[0], -1).float()
    sq = (x_true - x_imputed).pow(2).reshape(mask.shape[0], -1) * missing
    return sq.sum(1) / missing.sum(1).clamp_min(1)
