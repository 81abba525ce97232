"""Exact ELBO, log-likelihood, importance-weighted bound and their gradients for VAEs with a few binary latents,
by summing over every configuration of the latent bits.

For a guide whose latent sites are factorized Bernoulli distributions inside the data plate (a
``pyro_vae.VAE(latent="bernoulli")`` with ``z_dim`` up to about 12), every expectation over ``q(z | x)`` is a
finite sum over the ``2^bits`` configurations ``c``:

    ELBO(x) = sum_c q(c | x) [log p(x, c) - log q(c | x)],        log p(x) = logsumexp_c log p(x, c),

and the K-sample importance-weighted bound (Burda et al. 2016) is a sum over the ``2^(bits K)`` K-tuples. The
terms come from the VAE's own ``model`` and ``guide`` through Pyro: the guide and the model run once each,
conditioned on all configurations at once in an outer plate (:func:`enumerate_latents`), so there is no second
copy of the model. Autograd through the sums gives the exact gradients (:func:`exact_elbo_gradient`), the
reference that the gradient estimators of :mod:`pyro_vae.infer` are tested against: the loss whose gradient
:func:`pyro_vae.infer.variance.gradient_samples` samples is ``-exact_elbo(vae, x).sum()``, so
``flat_gradient(vae, -exact_elbo(vae, x).sum())`` has the columns of its samples.

All quantities are in nats per data point (no ``num_data`` scaling), at KL weight 1
(:func:`~pyro_vae.models.vae.unit_kl_weight`): the ELBO itself, never a beta-weighted objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_vae.distributions.relaxed_bernoulli import is_bernoulli
from pyro_vae.errors import ConfigError, message
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.validation import integer

__all__ = ["MAX_BITS", "MAX_TUPLES", "Enumeration", "latent_configurations", "enumerate_latents", "exact_elbo",
           "exact_log_likelihood", "exact_iwae_bound", "exact_elbo_gradient"]

#: The most latent bits enumerated (``2^16`` configurations per data point).
MAX_BITS = 16
#: The most K-tuples of configurations :func:`exact_iwae_bound` enumerates per data point.
MAX_TUPLES = 2 ** 20
_PLATE = "_enumeration"


@dataclass
class Enumeration:
    """Every configuration of the latent bits with its guide and joint log-densities.

    Attributes:
        values: ``{site: (C, batch, *event_shape)}``, the value of each latent site in each configuration, in
            the order of :func:`latent_configurations` over the sites' bits (guide order).
        log_q: ``(C, batch)`` ``log q(c | x)``, nats, differentiable in the guide's parameters.
        log_p: ``(C, batch)`` ``log p(x, c)``, nats, differentiable in the model's parameters.
    """

    values: dict[str, torch.Tensor]
    log_q: torch.Tensor
    log_p: torch.Tensor

    @property
    def log_weights(self) -> torch.Tensor:
        """``(C, batch)`` ``log p(x, c) - log q(c | x)``."""
        return self.log_p - self.log_q


def latent_configurations(bits: int, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """All ``2^bits`` binary vectors as a ``(2^bits, bits)`` tensor of 0s and 1s; row ``i`` is the binary
    expansion of ``i``, most significant bit first.

    Raises:
        ConfigError: ``bits`` not an integer in ``[1, MAX_BITS]``.
    """
    bits = integer("bits", bits, 1)
    if bits > MAX_BITS:
        raise ConfigError(message("bits", f"at most MAX_BITS = {MAX_BITS} latent bits to enumerate", str(bits),
                                  "use a VAE with fewer latent bits (z_dim <= 12 keeps it fast)"))
    i = torch.arange(2 ** bits, device=device)
    shifts = torch.arange(bits - 1, -1, -1, device=device)
    return ((i[:, None] >> shifts) & 1).to(dtype or torch.get_default_dtype())


def _latent_sites(trace: Any) -> list[tuple[str, Any]]:
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and type(site["fn"]).__name__ != "_Subsample"]


def _plate_nesting(*traces: Any) -> int:
    return max((len(site["cond_indep_stack"]) for tr in traces for site in tr.nodes.values()
                if site["type"] == "sample"), default=0)


def _per_point(site: Any, data_plate: str, dim: int) -> torch.Tensor:
    """The site's log-density reduced to ``(C, batch)``: summed over every batch dimension other than the
    enumeration plate's (``dim``) and the data plate's; scale and mask are not applied (nats per data point)."""
    lp = site["fn"].log_prob(site["value"])
    frames = {f.name: f for f in site["cond_indep_stack"]}
    if data_plate not in frames:
        raise ConfigError(message(f'site "{site["name"]}"', f'a site inside the data plate "{data_plate}"',
                                  "a site outside it (its log-density belongs to no single data point)",
                                  "enumerate a model whose sample sites all lie in the data plate"))
    n = -dim
    lp = lp.reshape((1,) * (n - lp.dim()) + tuple(lp.shape)) if lp.dim() < n else lp
    data_dim = frames[data_plate].dim
    keep = sorted({lp.dim() + dim, lp.dim() + data_dim})
    lp = lp.sum([d for d in range(lp.dim()) if d not in keep]) if lp.dim() > len(keep) else lp
    return lp


def enumerate_latents(vae: VAE, x: torch.Tensor, *, model: Callable | None = None, guide: Callable | None = None,
                      max_bits: int = MAX_BITS, **kwargs: Any) -> Enumeration:
    """``log q(c | x)`` and ``log p(x, c)`` of every configuration ``c`` of the guide's latent bits.

    The guide runs once plainly (to find its latent sites), then guide and model run once each inside an outer
    plate over the ``C = 2^bits`` configurations, every latent site conditioned on its values
    (``poutine.condition``), at KL weight 1. Each latent site must be an exact Bernoulli (values in ``{0, 1}``,
    any ``.to_event``) inside the data plate; several sites are enumerated jointly.

    Args:
        vae: the VAE (its data plate, site names and KL weight).
        x: ``(batch, *data_shape)``.
        model, guide: replace ``vae.model`` / ``vae.guide`` (same signature and sites).
        max_bits: refuse more latent bits than this (at most :data:`MAX_BITS`).
        kwargs: passed on to the model and guide.

    Returns:
        An :class:`Enumeration`, its log-densities ``(C, batch)``, differentiable.

    Raises:
        ConfigError: a latent site that is not an exact Bernoulli, a site outside the data plate, or more than
            ``max_bits`` bits.
    """
    model, guide = model or vae.model, guide or vae.guide
    max_bits = min(integer("max_bits", max_bits, 1), MAX_BITS)
    x = vae.as_data(x)
    with unit_kl_weight(vae, model, guide):
        with torch.no_grad():
            plain = poutine.trace(guide).get_trace(x, **kwargs)
            model_plain = poutine.trace(poutine.replay(model, trace=plain)).get_trace(x, **kwargs)
        sites = _latent_sites(plain)
        if not sites:
            raise ConfigError(message("guide", "at least one latent sample site", "none",
                                      "enumerate a VAE whose guide samples its latents"))
        sizes = []
        for name, site in sites:
            if not is_bernoulli(site["fn"]):
                raise ConfigError(message(
                    f'latent site "{name}"', "an exact Bernoulli (values in {0, 1}) to enumerate",
                    type(site["fn"]).__name__,
                    'build the VAE with latent="bernoulli" (not relaxed) or enumerate another way'))
            sizes.append(math.prod(site["fn"].event_shape))
        bits = sum(sizes)
        if bits > max_bits:
            raise ConfigError(message("latent bits", f"at most max_bits = {max_bits} to enumerate",
                                      f"{bits} ({', '.join(f'{n}: {s}' for (n, _), s in zip(sites, sizes))})",
                                      "use a VAE with fewer latent bits, or raise max_bits"))
        configs = latent_configurations(bits, x.dtype, x.device)
        values: dict[str, torch.Tensor] = {}
        start = 0
        for (name, site), size in zip(sites, sizes):
            fn = site["fn"]
            part = configs[:, start: start + size].reshape(len(configs), *fn.event_shape)
            shape = (len(configs), *fn.batch_shape, *fn.event_shape)
            values[name] = part.reshape(len(configs), *(1,) * len(fn.batch_shape), *fn.event_shape).expand(shape)
            start += size
        dim = -(_plate_nesting(plain, model_plain) + 1)
        data_plate = vae.site("data")
        with pyro.plate(_PLATE, len(configs), dim=dim):
            guide_trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(x, **kwargs)
        with pyro.plate(_PLATE, len(configs), dim=dim):
            model_trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, **kwargs)
    log_q = torch.stack([_per_point(guide_trace.nodes[name], data_plate, dim) for name, _ in sites]).sum(0)
    log_p = torch.stack([_per_point(site, data_plate, dim) for site in model_trace.nodes.values()
                         if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample"]).sum(0)
    return Enumeration(values, log_q, log_p)


def exact_elbo(vae: VAE, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The exact ELBO of each data point, ``sum_c q(c|x) [log p(x, c) - log q(c|x)]``, ``(batch,)`` nats,
    differentiable in every parameter of the model and guide (``kwargs`` as :func:`enumerate_latents`)."""
    e = enumerate_latents(vae, x, **kwargs)
    q = e.log_q.exp()
    terms = torch.where(q > 0, q * e.log_weights, torch.zeros_like(q))  # 0 log 0 = 0
    return terms.sum(0)


def exact_log_likelihood(vae: VAE, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The exact marginal log-likelihood ``log p(x) = logsumexp_c log p(x, c)`` of each data point, ``(batch,)``
    nats (``kwargs`` as :func:`enumerate_latents`)."""
    return enumerate_latents(vae, x, **kwargs).log_p.logsumexp(0)


def exact_iwae_bound(vae: VAE, x: torch.Tensor, k: int, **kwargs: Any) -> torch.Tensor:
    """The exact K-sample importance-weighted bound of each data point (Burda et al. 2016),
    ``E_{c_1..c_K ~ q} log (1/K) sum_i p(x, c_i) / q(c_i | x)``, summed over all ``C^K`` K-tuples, ``(batch,)``
    nats, differentiable (``k = 1`` is :func:`exact_elbo`).

    Raises:
        ConfigError: ``k`` not an integer >= 1, or more than :data:`MAX_TUPLES` K-tuples.
    """
    k = integer("k", k, 1)
    e = enumerate_latents(vae, x, **kwargs)
    c = e.log_q.shape[0]
    if c ** k > MAX_TUPLES:
        raise ConfigError(message("k", f"at most MAX_TUPLES = {MAX_TUPLES} K-tuples of configurations",
                                  f"{c}^{k} = {c ** k}", "lower k or the number of latent bits"))
    idx = torch.cartesian_prod(*[torch.arange(c, device=e.log_q.device)] * k).reshape(-1, k)  # (C^K, K)
    log_q, log_w = e.log_q[idx], e.log_weights[idx]  # (C^K, K, batch)
    prob = log_q.sum(1).exp()
    bound = log_w.logsumexp(1) - math.log(k)
    return torch.where(prob > 0, prob * bound, torch.zeros_like(prob)).sum(0)


def exact_elbo_gradient(vae: VAE, x: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The exact gradient of the batch ELBO ``sum_n ELBO(x_n)`` with respect to every trainable parameter of the
    VAE's modules, ``{name: tensor of the parameter's shape}`` in ``vae.named_parameters()`` order (zeros for a
    parameter the ELBO does not reach). The gradient of the training loss is its negative
    (``kwargs`` as :func:`enumerate_latents`)."""
    params = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(exact_elbo(vae, x, **kwargs).sum(), [p for _, p in params], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)}
