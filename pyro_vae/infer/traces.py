"""Per-data-point log-densities read off Pyro traces: the engine under evaluation, generation and imputation.

The guide runs under an outer ``pyro.plate`` of ``K`` particles placed left of every plate of the model and the
guide (so the encoder runs once and the decoder sees a ``(K, batch, ...)`` latent), the model is replayed
against the guide's trace, and each sample site's ``log_prob`` is reduced to one value per particle and data
point, ``(K, batch)``. The log-densities are unscaled: minibatch (``num_data``) and KL-weight (``beta``)
scaling are training devices, not part of ``p`` or ``q``. All values are in nats per data point.

Any prior, likelihood or latent type that the model/guide pair accepts works unchanged; the model and the
guide take the batch ``x`` as their only argument here and keep the sites of :class:`pyro_vae.VAE`
(``site("data")``, ``site("z")``, ``site("x")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.errors import ConfigError, message
from pyro_vae.models.vae import VAE
from pyro_vae.validation import integer

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

__all__ = ["PARTICLE_PLATE", "MAX_ELEMENTS", "trace_guide_and_model", "max_plate_nesting", "particle_plate_dim",
           "per_point_log_prob", "masked_log_prob", "SiteLogProb", "site_log_probs", "ParticleLogProbs",
           "particle_log_probs", "sample_chunk_size", "particle_chunks"]

PARTICLE_PLATE = "_iw_particles"
"""Name of the plate over importance samples (particles) that :func:`particle_log_probs` wraps the guide in."""
MAX_ELEMENTS = 2 ** 24
"""Bound on ``K * batch * data size`` held at once by :func:`sample_chunk_size` (64 MiB of float32)."""


def trace_guide_and_model(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[Trace, Trace]:
    """Run the guide, then the model replayed against the guide's trace (the model's latent sites take the
    guide's values), both on ``(*args, **kwargs)``: the pair of traces every ELBO of Pyro starts from.

    Returns:
        ``(guide_trace, model_trace)``, unpruned (plate subsample sites included) and without ``log_prob``
        computed.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def max_plate_nesting(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """The number of vectorized plate dimensions the model and the guide use on ``(*args, **kwargs)``:
    ``max(-frame.dim)`` over the plates of every sample site of both traces, at least 1 (the data plate).

    Reads the traces as Pyro's ``ELBO`` guesses its ``max_plate_nesting`` (run once, outside any enclosing
    handler, assuming a static structure), without its shape checks. An outer plate placed at
    ``dim=-(max_plate_nesting + 1)`` (:func:`particle_plate_dim`) is left of every plate of the pair.
    """
    with poutine.block():
        guide_trace, model_trace = trace_guide_and_model(model, guide, *args, **kwargs)
    dims = [-f.dim for tr in (guide_trace, model_trace) for site in tr.nodes.values()
            if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims, default=1)


def particle_plate_dim(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """The (negative) batch dimension of the particle plate: ``-(max_plate_nesting(...) + 1)``, left of every
    plate of the model and the guide (:func:`max_plate_nesting`)."""
    return -(max_plate_nesting(model, guide, *args, **kwargs) + 1)


def per_point_log_prob(site: Message, log_p: torch.Tensor, particle_dim: int, data_plate: str, num_particles: int,
                       batch: int) -> torch.Tensor:
    """A site's log-density reduced to ``(num_particles, batch)`` (nats per particle and data point): every
    batch dimension other than the particle plate's (``particle_dim``) and the data plate's is summed.

    Args:
        site: a sample site of a trace run under the particle plate.
        log_p: its log-density, of the site's batch shape (dimensions of size 1 broadcast).
        particle_dim: the particle plate's dimension (:func:`particle_plate_dim`).
        data_plate: the name of the plate over data points (``vae.site("data")``).
        num_particles, batch: the sizes of the particle and data plates.

    Raises:
        ConfigError: the site is not inside the data plate (a global latent has no value per data point).
    """
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == data_plate]
    if not data_dims:
        raise ConfigError(message(
            f'site "{site["name"]}"', f'a site inside the data plate "{data_plate}" (one value per data point)',
            "a site outside it (a global latent variable)",
            "log p(x) per data point needs per-data-point sites; integrate global latents out in the model"))
    data_dim = cast(int, data_dims[0])  # the data plate is vectorized: it has a dim
    nd = max(-particle_dim, log_p.dim())
    log_p = log_p.reshape((1,) * (nd - log_p.dim()) + tuple(log_p.shape))
    other = [d for d in range(-nd, 0) if d not in (particle_dim, data_dim)]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    log_p = log_p.movedim((particle_dim, data_dim), (0, 1))
    return log_p.reshape(log_p.shape[0], log_p.shape[1]).expand(num_particles, batch)


def masked_log_prob(site: Message, mask: torch.Tensor) -> torch.Tensor:
    """``log p(x_obs | z)`` of an observed site: its entry-wise log-densities summed over the entries where
    ``mask`` is ``True`` only (nats; the site's batch shape).

    Args:
        site: an observed sample site whose distribution is entry-wise (event shape ``()``) under
            ``Independent`` wrappers.
        mask: boolean, ``True`` where observed, broadcastable to the site's value.

    Raises:
        ConfigError: the likelihood scores the whole data point at once (event shape other than ``()``), so
            missing entries cannot be left out.
    """
    fn, n_event = cast(dist.TorchDistribution, site["fn"]), 0
    while isinstance(fn, dist.Independent):
        n_event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if fn.event_shape:
        raise ConfigError(message(
            f'likelihood at site "{site["name"]}"', "a distribution over single entries (event shape ())",
            f"event shape {tuple(fn.event_shape)} for the whole data point",
            "return an entry-wise distribution from the likelihood so missing entries can be left out"))
    log_p = fn.log_prob(cast(torch.Tensor, site["value"]))
    log_p = torch.where(mask.to(log_p.device).expand_as(log_p), log_p, torch.zeros((), device=log_p.device))
    return log_p.sum(dim=tuple(range(-n_event, 0))) if n_event else log_p


@dataclass
class SiteLogProb:
    """One sample site's unscaled log-density per importance sample and data point, ``(K, batch)`` (nats)."""

    role: str  # "guide" or "model"
    name: str
    site: Any  # the trace's site (Pyro's message)
    log_prob: torch.Tensor


def site_log_probs(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, particle_dim: int,
                   data_plate: str, *, obs_site: str | None = None, obs_mask: torch.Tensor | None = None,
                   local_only: bool = False) -> tuple[Trace, Trace, list[SiteLogProb]]:
    """The ``num_particles`` importance samples of the batch ``x`` behind every importance weight: the guide
    traced under the particle plate (:data:`PARTICLE_PLATE` at ``particle_dim``), the model replayed against it
    (:func:`trace_guide_and_model`), and each sample site's log-density (its mask applied, its scale not)
    reduced per particle and data point by :func:`per_point_log_prob`, guide sites first.

    Args:
        model, guide: Pyro callables of ``x``.
        x: ``(batch, ...)``.
        data_plate: the name of the data plate.
        obs_site, obs_mask: with both, the observed site ``obs_site`` scores the entries where ``obs_mask`` is
            ``True`` only (:func:`masked_log_prob`).
        local_only: leave out the sites outside the data plate (global sites held fixed, not part of
            ``p(x | globals)``); otherwise such a site is an error.

    Returns:
        ``(guide_trace, model_trace, terms)``, ``terms`` a :class:`SiteLogProb` per sample site.

    Raises:
        ConfigError: a site outside the data plate (without ``local_only``), or a masked likelihood that is
            not entry-wise.
    """
    batch = x.shape[0]
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        guide_trace, model_trace = trace_guide_and_model(model, guide, x)
    terms = []
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            if local_only and all(f.name != data_plate for f in site["cond_indep_stack"]):
                continue
            if site["is_observed"] and name == obs_site and obs_mask is not None:
                log_p = masked_log_prob(site, obs_mask)
            else:
                log_p = cast(dist.TorchDistribution, site["fn"]).log_prob(cast(torch.Tensor, site["value"]))
                log_p = scale_and_mask(log_p, 1.0, site["mask"])
            terms.append(SiteLogProb(role, name, site, per_point_log_prob(site, log_p, particle_dim, data_plate,
                                                                         num_particles, batch)))
    return guide_trace, model_trace, terms


@dataclass
class ParticleLogProbs:
    """Log-densities of ``K`` importance samples ``z_k ~ q(z | x)`` for a batch, each ``(K, batch)`` in nats per
    data point (unscaled).

    Attributes:
        log_q: ``log q(z_k | x)``, summed over the guide's sites.
        log_p_latent: ``log p(z_k)``, summed over the model's latent sites.
        log_p_obs: ``log p(x | z_k)``, summed over the model's observed sites (over observed entries only
            when a mask was given).
        log_w: the log importance weights ``log_p_latent + log_p_obs - log_q``.
        z: the guide's values of the latent site ``(K, batch, *latent_event_shape)``, when asked for.
        x_mean: the mean of the observed site ``(K, batch, *data_shape)``, when asked for.
    """

    log_q: torch.Tensor
    log_p_latent: torch.Tensor
    log_p_obs: torch.Tensor
    log_w: torch.Tensor
    z: torch.Tensor | None = None
    x_mean: torch.Tensor | None = None


def particle_log_probs(vae: VAE, model: Callable, guide: Callable, x: torch.Tensor, num_particles: int,
                       particle_dim: int, *, obs_mask: torch.Tensor | None = None,
                       keep: Sequence[str] = ()) -> ParticleLogProbs:
    """``num_particles`` importance samples for the batch ``x``: the guide traced under the particle plate
    (:data:`PARTICLE_PLATE` at ``particle_dim``), the model replayed against it
    (:func:`trace_guide_and_model`), every sample site's unscaled log-density reduced per particle and data point
    (:func:`per_point_log_prob`). No gradients are stopped: call it under ``torch.no_grad()`` to record none.

    Args:
        vae: names the sites (``vae.site("data")``, ``"z"``, ``"x"``) and gives ``data_shape``.
        model, guide: Pyro callables of ``x`` with the VAE's sites (``vae.model``, ``vae.guide`` or others).
        x: ``(batch, *data_shape)``.
        num_particles: ``K``.
        particle_dim: the particle plate's dimension (:func:`particle_plate_dim`).
        obs_mask: boolean ``True`` where ``x`` is observed: the observed site then scores those entries only
            (:func:`masked_log_prob`).
        keep: ``"z"`` and/or ``"x_mean"`` to also return those tensors.

    Returns:
        :class:`ParticleLogProbs`, each log-density ``(K, batch)``.

    Raises:
        ConfigError: a site outside the data plate, or a masked likelihood that is not entry-wise.
    """
    batch = x.shape[0]
    x_site = vae.site("x")
    guide_trace, model_trace, terms = site_log_probs(model, guide, x, num_particles, particle_dim, vae.site("data"),
                                                     obs_site=x_site, obs_mask=obs_mask)
    zero = torch.zeros(num_particles, batch, device=x.device)
    sums = {"log_q": zero, "log_p_latent": zero, "log_p_obs": zero}
    x_mean = None
    for term in terms:
        site = term.site
        slot = "log_q" if term.role == "guide" else ("log_p_obs" if site["is_observed"] else "log_p_latent")
        sums[slot] = sums[slot] + term.log_prob
        if term.role == "model" and term.name == x_site and "x_mean" in keep:
            x_mean = cast(dist.TorchDistribution, site["fn"]).mean.expand(num_particles, batch, *vae.data_shape)
    z = None
    if "z" in keep:
        z = cast(torch.Tensor, guide_trace.nodes[vae.site("z")]["value"])
        z = z.expand(num_particles, batch, *z.shape[2:]) if z.dim() >= 2 else z
    return ParticleLogProbs(log_q=sums["log_q"], log_p_latent=sums["log_p_latent"], log_p_obs=sums["log_p_obs"],
                            log_w=sums["log_p_latent"] + sums["log_p_obs"] - sums["log_q"], z=z, x_mean=x_mean)


def sample_chunk_size(num_samples: int, batch: int, data_shape: Sequence[int],
                      chunk_size: int | None = None) -> int:
    """Importance samples per chunk for a batch of ``batch`` points of ``data_shape``: ``chunk_size`` (an integer
    >= 1) capped at ``num_samples``, or by default the most that keep ``chunk * batch * prod(data_shape)`` under
    :data:`MAX_ELEMENTS` (at least 1).

    Raises:
        ConfigError: ``chunk_size`` given but not an integer >= 1.
    """
    if chunk_size is not None:
        return min(integer("chunk_size", chunk_size), num_samples)
    per_sample = batch * max(math.prod(data_shape), 1)
    return max(1, min(num_samples, MAX_ELEMENTS // per_sample))


def particle_chunks(vae: VAE, model: Callable, guide: Callable, x: torch.Tensor, num_samples: int,
                    particle_dim: int, *, chunk_size: int | None = None, obs_mask: torch.Tensor | None = None,
                    keep: Sequence[str] = ()) -> Iterator[ParticleLogProbs]:
    """``num_samples`` importance samples for the batch ``x`` in chunks of at most :func:`sample_chunk_size`
    samples: one :class:`ParticleLogProbs` (each log-density ``(chunk, batch)``, nats) per chunk, from
    :func:`particle_log_probs` with the same arguments. Combine them with a running ``logsumexp`` to keep memory
    bounded for any ``num_samples``."""
    k = sample_chunk_size(num_samples, x.shape[0], vae.data_shape, chunk_size)
    for start in range(0, num_samples, k):
        yield particle_log_probs(vae, model, guide, x, min(k, num_samples - start), particle_dim,
                                 obs_mask=obs_mask, keep=keep)
