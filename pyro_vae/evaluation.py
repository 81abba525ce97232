"""Evaluation of a trained VAE: the importance-sampled log-likelihood, the gap to the ELBO, active units,
Pareto-k diagnostics of the importance weights, export to ArviZ, and the amortization gap.

Every estimate is read off Pyro traces of ``vae.model`` and ``vae.guide`` (:mod:`pyro_vae.infer.traces`): the
guide runs once per batch under an outer ``pyro.plate`` over ``K`` particles (so the encoder runs once and the
decoder sees a ``(K, batch, z_dim)`` tensor), the model is replayed against the guide's trace, and each site's
``log_prob`` (unscaled: minibatch and beta scaling are training devices, not part of ``p``) is reduced to
``(K, batch)``. Any prior, likelihood or latent type that the model/guide pair accepts works unchanged. The
functions take the model's named context as ``context={name: value}``, passed to the model and guide as keyword
arguments: each batch gets its points' rows of the per-data-point values
(:func:`pyro_vae.models.context.check_context`), shared by a point's ``K`` samples.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.util import get_rng_state, set_rng_state

from pyro_vae.data import as_tensor_data
from pyro_vae.distributions.relaxed import log_class_probs
from pyro_vae.encoders import GaussianEncoder
from pyro_vae.errors import ConfigError, DataError, ShapeError, message
from pyro_vae.infer.pair import (
    ModelGuidePair,
    PairStructure,
    as_data_rows,
    as_pair,
    pair_structure,
    plate_clash_explained,
)
from pyro_vae.infer.traces import (
    max_plate_nesting,
    particle_chunks,
    particle_log_probs,
    particle_plate_dim,
    sample_chunk_size,
    site_log_probs,
    trace_guide_and_model,
)
from pyro_vae.models.context import check_context, context_rows, declared_shapes
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.validation import integer

__all__ = ["LogLikelihood", "log_likelihood", "importance_log_weights", "pareto_k", "active_units",
           "latent_variances", "to_inference_data", "AmortizationGap", "amortization_gap", "posterior_means",
           "as_data_set", "PARETO_K_MIN_SAMPLES"]


# ----------------------------------------------------------------------------------------- the data
def as_data_set(vae: VAE, data: Any, what: str = "data") -> torch.Tensor:
    """The ``(N, *data_shape)`` data set of ``data`` (a tensor, array or :class:`pyro_vae.data.Dataset`), cast to
    the VAE's dtype. Values are checked in the model under Pyro's validation.

    Raises:
        DataError: ``data`` (named ``what``) is not ``(N, *data_shape)``, is empty or is not numeric.
        ConfigError: ``vae`` is not a :class:`pyro_vae.VAE` (the functions that read a VAE's latent site,
            encoder or data shape take no other model/guide pair).
    """
    _vae_only(vae)
    return vae.as_data(as_tensor_data(data, what), what, data_set=True)


def _vae_only(vae: Any) -> None:
    if not isinstance(vae, VAE):
        raise ConfigError(message("vae", "a pyro_vae.VAE (this function reads the VAE's latent site, encoder or data "
                                  "shape)", type(vae).__name__, "pass the VAE inside your model; log_likelihood, "
                                  "evaluate_elbo and to_inference_data take any model/guide pair"))


def _with_context(fn: Callable, rows: Mapping[str, Any]) -> Callable:
    """``fn`` with the named context ``rows`` bound as keyword arguments (``fn`` itself without any)."""
    return functools.partial(fn, **rows) if rows else fn


def importance_log_weights(vae: VAE, x: torch.Tensor, num_samples: int, *,
                           model: Callable | None = None, guide: Callable | None = None,
                           chunk_size: int | None = None, context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Log importance weights ``log p(x, z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``, as a
    ``(batch, num_samples)`` tensor on ``x``'s device, nats per data point (no gradients).

    Args:
        x: ``(batch, *data_shape)``.
        model, guide: replace ``vae.model`` / ``vae.guide`` (same signature and sites).
        chunk_size: samples traced at once (``None``: :func:`pyro_vae.infer.traces.sample_chunk_size`).
        context: the batch's named context, passed to the model and guide as keyword arguments: per-data-point
            values ``(batch, ...)``, row ``n`` with ``x[n]`` (the ``K`` samples of a point share its row), and
            global values (:func:`pyro_vae.models.context.check_context`).

    Raises:
        ConfigError: ``num_samples`` or ``chunk_size`` not an integer >= 1; a ``context`` that is not a dict.
        DataError: a per-data-point context value whose first dimension is not ``batch``.
    """
    _vae_only(vae)
    ctx = check_context("context", context, x.shape[0], declared_shapes(vae), x.device)
    model, guide = _with_context(model or vae.model, ctx), _with_context(guide or vae.guide, ctx)
    num_samples = integer("num_samples", num_samples)
    particle_dim = particle_plate_dim(model, guide, x)
    with torch.no_grad():
        parts = [c.log_w for c in particle_chunks(vae, model, guide, x, num_samples, particle_dim,
                                                  chunk_size=chunk_size)]
    return torch.cat(parts).T


# ------------------------------------------------------------------------------------ log-likelihood
def _standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of ``values`` (NaN for fewer than two)."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan


@dataclass
class LogLikelihood:
    """Importance-sampled log-likelihood of a data set, in nats per data point.

    Attributes:
        mean: mean over data points of the estimate ``log p(x)`` (the IWAE bound with ``num_samples``).
        se: its standard error over data points (``std / sqrt(N)``).
        per_point: ``(N,)`` estimates of ``log p(x_n)``.
        elbo: mean ELBO per data point, estimated from the same samples (the mean log-weight). With
            :attr:`global_values`, the ELBO of the local part given them, ``E_q[log p(x, z | globals) -
            log q(z | x, globals)]``, a lower bound on ``log p(x | globals)`` (the global sites' own terms are
            not in it).
        elbo_per_point: ``(N,)`` ELBO estimates (given :attr:`global_values` when set).
        num_samples: importance samples per data point ``K``.
        log_weights: ``(N, K)`` log importance weights when requested, else ``None``.
        global_values: for a model/guide pair with global latents (sites outside the data plate), the value of
            each global site that every estimate holds fixed (the same for all ``K`` samples and data points):
            ``log p(x)`` is then ``log p(x | globals)``, the local part's marginal likelihood given them. ``None``
            for a model without global latents (a VAE).
        global_source: where :attr:`global_values` came from: ``"given"`` (all passed by the caller),
            ``"guide"`` (one draw from the guide), ``"given+guide"`` (some given, the rest drawn from the
            guide given those), or ``None`` without global latents.
    """

    mean: float
    se: float
    per_point: torch.Tensor
    elbo: float
    elbo_per_point: torch.Tensor
    num_samples: int
    log_weights: torch.Tensor | None = field(default=None, repr=False)
    global_values: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    global_source: str | None = None

    @property
    def gap_per_point(self) -> torch.Tensor:
        """``(N,)`` estimates of ``log p(x) - ELBO``, i.e. of ``KL(q(z|x) || p(z|x))``."""
        return self.per_point - self.elbo_per_point

    @property
    def gap(self) -> float:
        """Mean of :attr:`gap_per_point` (nats per data point)."""
        return float(self.gap_per_point.mean())

    @property
    def gap_se(self) -> float:
        """Standard error of :attr:`gap` over the data points (``std / sqrt(N)``, nats; NaN for ``N < 2``)."""
        return _standard_error(self.gap_per_point)

    def pareto_k(self) -> torch.Tensor:
        """``(N,)`` Pareto-k of each data point's importance weights (needs ``return_log_weights=True``)."""
        if self.log_weights is None:
            raise ConfigError(message("LogLikelihood.pareto_k", "log weights kept", "log_weights=None",
                                      "call log_likelihood(..., return_log_weights=True)"))
        return pareto_k(self.log_weights)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary (nats per data point), keyed as the attributes: ``log_likelihood`` (:attr:`mean`,
        the K-sample bound), ``log_likelihood_se``, ``elbo`` (:attr:`elbo`, the mean log-weight), ``gap``,
        ``gap_se``, ``num_samples``, ``num_points``; ``global_source`` for a pair with global latents; the Pareto
        k summaries when :attr:`log_weights` were kept."""
        out: dict[str, Any] = {"log_likelihood": self.mean, "log_likelihood_se": self.se, "elbo": self.elbo,
                               "gap": self.gap, "gap_se": self.gap_se, "num_samples": self.num_samples,
                               "num_points": int(len(self.per_point))}
        if self.global_source is not None:
            out["global_source"] = self.global_source
        if self.log_weights is not None:
            k = self.pareto_k()
            out.update({"pareto_k_mean": float(k.mean()), "pareto_k_max": float(k.max()),
                        "pareto_k_frac_above_0.7": float((k > 0.7).float().mean()),
                        "pareto_k_frac_above_0.5": float((k > 0.5).float().mean())})
        return out


def log_likelihood(vae: VAE | ModelGuidePair | Any, data: Any, num_samples: int = 1000, *, batch_size: int = 256,
                   chunk_size: int | None = None, return_log_weights: bool = False,
                   model: Callable | None = None, guide: Callable | None = None,
                   global_values: Mapping[str, Any] | None = None,
                   context: Mapping[str, Any] | None = None) -> LogLikelihood:
    """Importance-sampled log-likelihood (Burda et al. 2016, "Importance Weighted Autoencoders"):

    ``log p(x) ~ logsumexp_k [log p(x, z_k) - log q(z_k | x)] - log K``, ``z_k ~ q(z | x)``,

    a lower bound in expectation for every ``K`` that tightens to ``log p(x)`` as ``K`` grows. Data points
    go through in batches of ``batch_size`` and samples in chunks (at most ``chunk_size``, by default
    sized so that ``chunk * batch * data size`` stays under 2^24 elements), combined by a running
    logsumexp, so memory stays bounded for any ``K``. Runs on the VAE's device.

    Args:
        vae: the VAE (its ``model`` and ``guide`` are traced unless ``model``/``guide`` are given).
        data: ``(N, *data_shape)`` tensor or :class:`pyro_vae.data.Dataset`.
        num_samples: ``K``, importance samples per data point.
        batch_size: data points per batch.
        chunk_size: samples per chunk (``None``: automatic).
        return_log_weights: keep the ``(N, K)`` log weights (for Pareto-k and ArviZ).
        model, guide: Pyro callables with the VAE's signature and sites, replacing ``vae.model`` /
            ``vae.guide`` (e.g. a per-data-point optimized guide).
        global_values: for a model/guide pair, point values of global latent sites, by site name.
        context: the data's named context, passed to the model and guide (and ``model``/``guide``) as keyword
            arguments. A tensor whose first dimension is ``N`` is per data point: each batch gets its rows, and
            the ``K`` importance samples of a point share its row (a ``(batch, ...)`` row tensor broadcast against
            the ``(K, batch, ...)`` samples); every other value is global, passed whole
            (:func:`pyro_vae.models.context.check_context`).

    ``vae`` may be any model/guide pair (:class:`pyro_vae.ModelGuidePair`, :mod:`pyro_vae.infer.pair`; ``data``
    ``(N, ...)``). Its global latents (the model's latent sites outside the data plate) are held fixed: at
    ``global_values`` where given, the others at one draw from the guide (given those), and the estimate is
    ``log p(x_n | globals)``, the local part's log-likelihood given them: the guide and the model are run
    conditioned on the globals (:func:`pyro.poutine.condition`), so all ``K`` importance samples of every point
    share them, and only the sites inside the data plate enter the weights (the globals' own prior and guide
    densities do not). The result's ``global_values`` and ``global_source`` say which values were held and where
    they came from.

    Returns:
        :class:`LogLikelihood` with the mean, its standard error, the per-point values, the ELBO and the gap.

    Raises:
        ConfigError: an argument out of range; ``global_values`` naming a site that is not a global latent of
            the model (or given with a VAE); a pair without a data plate (:func:`pyro_vae.infer.pair.as_pair`).
        ShapeError: a ``global_values`` value whose shape is not that of the guide's draw of its site.
        DataError: data of the wrong shape or not finite, or a non-finite estimate; a per-data-point context
            value whose first dimension is not ``N``.
        ModelError: a guide that opens a plate twice (an autoguide re-creating it).
    """
    vae = as_pair(vae)
    if isinstance(vae, ModelGuidePair):
        if model is not None or guide is not None:
            raise ConfigError(message("model, guide", "None with a model/guide pair (it has its own)",
                                      "a replacement model or guide", "pass ModelGuidePair(model, guide) instead"))
        return _pair_log_likelihood(vae, data, num_samples, batch_size, chunk_size, return_log_weights,
                                    global_values, context)
    if global_values:
        raise ConfigError(message("global_values", "none for a VAE (it has no global latents)",
                                  f"values for {sorted(global_values)}", "drop global_values"))
    x = as_data_set(vae, data)
    num_samples = integer("num_samples", num_samples)
    batch_size = integer("batch_size", batch_size)
    model, guide = model or vae.model, guide or vae.guide
    device = vae.device
    n = x.shape[0]
    ctx = check_context("context", context, n, declared_shapes(vae), device)
    was_training = vae.training
    vae.eval()

    def batches() -> Iterator[tuple[torch.Tensor, Iterator[torch.Tensor]]]:
        for i in range(0, n, batch_size):
            xb = x[i: i + batch_size].to(device)
            rows = context_rows(ctx, n, slice(i, i + batch_size))
            chunks = particle_chunks(vae, _with_context(model, rows), _with_context(guide, rows), xb, num_samples,
                                     particle_dim, chunk_size=chunk_size)
            yield xb, (chunk.log_w for chunk in chunks)

    try:
        with torch.no_grad():
            first = context_rows(ctx, n, slice(0, batch_size))
            particle_dim = particle_plate_dim(_with_context(model, first), _with_context(guide, first),
                                              x[:batch_size].to(device))
            return _importance_log_likelihood(batches(), num_samples, return_log_weights)
    finally:
        vae.train(was_training)


def _importance_log_likelihood(batches: Iterable[tuple[torch.Tensor, Iterable[torch.Tensor]]], num_samples: int,
                               return_log_weights: bool, global_values: dict[str, torch.Tensor] | None = None,
                               global_source: str | None = None) -> LogLikelihood:
    """The :class:`LogLikelihood` of ``batches``: for each batch ``xb`` (``(b, ...)``, on the device), its
    ``num_samples`` log importance weights in chunks of ``(chunk, b)`` (nats), combined by a running logsumexp
    into ``log p(x)`` per data point, and averaged into the ELBO per data point.

    Raises:
        DataError: a non-finite estimate of ``log p(x)``.
    """
    lls, elbos, lws = [], [], []
    for xb, log_ws in batches:
        lse = torch.full((xb.shape[0],), -math.inf, device=xb.device)
        total = torch.zeros(xb.shape[0], device=xb.device)
        kept = []
        for lw in log_ws:
            lse = torch.logaddexp(lse, lw.logsumexp(0))
            total += lw.sum(0)
            if return_log_weights:
                kept.append(lw.T.cpu())
        lls.append((lse - math.log(num_samples)).cpu())
        elbos.append((total / num_samples).cpu())
        if return_log_weights:
            lws.append(torch.cat(kept, dim=1))
    per_point, elbo_pp = torch.cat(lls), torch.cat(elbos)
    if not bool(torch.isfinite(per_point).all()):
        bad = int((~torch.isfinite(per_point)).sum())
        raise DataError(message("log_likelihood", "finite log-weights", f"{bad} data points with non-finite log p(x)",
                                "check the data against the likelihood's support and the guide's scales"))
    return LogLikelihood(mean=float(per_point.mean()), se=_standard_error(per_point), per_point=per_point,
                         elbo=float(elbo_pp.mean()), elbo_per_point=elbo_pp, num_samples=num_samples,
                         log_weights=torch.cat(lws) if return_log_weights else None, global_values=global_values,
                         global_source=global_source)


@dataclass
class _PairParticles:
    """``k`` importance samples of a batch of a model/guide pair, its globals held fixed (nats, unscaled)."""

    log_w: torch.Tensor  # (k, batch): the sites inside the data plate only
    log_p_obs: torch.Tensor  # (k, batch): the observed sites inside the data plate
    latents: dict[str, torch.Tensor]  # local latent site -> (k, batch, ...), where asked for


def _per_point_value(site: Any, particle_dim: int, data_plate: str, k: int, b: int) -> torch.Tensor:
    """A local site's value as ``(k, b, *other batch dims, *event_shape)``: the particle and the data plate's
    dimensions first."""
    v = cast(torch.Tensor, site["value"])
    event = len(cast(dist.TorchDistribution, site["fn"]).event_shape)
    need = -particle_dim
    if v.dim() - event < need:
        v = v.reshape((1,) * (need - (v.dim() - event)) + tuple(v.shape))
    data_dim = next(cast(int, f.dim) for f in site["cond_indep_stack"] if f.name == data_plate)
    v = v.movedim(need + data_dim, 1)
    return v.expand(k, b, *v.shape[2:])


def _pair_particles(model: Callable, guide: Callable, xb: torch.Tensor, k: int, particle_dim: int,
                    data_plate: str, keep: Sequence[str] = ()) -> _PairParticles:
    """``k`` importance samples of the batch ``xb`` for a model and guide conditioned on their globals: the guide
    traced under the particle plate, the model replayed against it; only the sites inside the data plate enter
    the weights (a global site is held fixed and is not part of ``p(x | globals)``)."""
    b = xb.shape[0]
    _, _, terms = site_log_probs(model, guide, xb, k, particle_dim, data_plate, local_only=True)
    lw = torch.zeros(k, b, device=xb.device)
    obs = torch.zeros(k, b, device=xb.device)
    latents = {}
    for term in terms:
        model_site = term.role == "model"
        lw = lw + (1.0 if model_site else -1.0) * term.log_prob
        if model_site and term.site["is_observed"]:
            obs = obs + term.log_prob
        if model_site and term.name in keep:
            latents[term.name] = _per_point_value(term.site, particle_dim, data_plate, k, b)
    return _PairParticles(lw, obs, latents)


@dataclass
class _HeldGlobals:
    """A model/guide pair conditioned on fixed values of its global latents (see :func:`log_likelihood`)."""

    model: Callable
    guide: Callable
    values: dict[str, torch.Tensor]
    source: str | None  # "given", "guide", "given+guide", or None without global latents
    particle_dim: int


def _held_globals(pair: ModelGuidePair, structure: PairStructure, first: torch.Tensor,
                  given: Mapping[str, Any] | None, context: Mapping[str, Any]) -> _HeldGlobals:
    """Fix ``pair``'s global latents: at ``given`` values, the others at one draw from the guide (given those,
    on the batch ``first`` and its ``context`` rows); the model and the guide conditioned on them. Call without
    gradients."""
    values: dict[str, torch.Tensor] = {}
    for name, value in (given or {}).items():
        if name not in structure.global_sites:
            raise ConfigError(message(f"global_values[{name!r}]", "a global latent site of the model (outside the "
                                      f"data plate {structure.data_plate!r}): one of "
                                      f"{list(structure.global_sites)}", repr(name), "drop it or fix its name"))
        values[name] = torch.as_tensor(value, device=first.device)
    if values:  # each given value has the shape of the guide's draw of its site
        with torch.random.fork_rng(devices=[first.device] if first.device.type == "cuda" else []):
            rng = get_rng_state()  # this look at the shapes leaves the draws that follow as they were
            _, drawn = trace_guide_and_model(pair.model, pair.guide, first, **context)
            set_rng_state(rng)
        for name, value in values.items():
            shape = tuple(cast(torch.Tensor, drawn.nodes[name]["value"]).shape)
            if tuple(value.shape) != shape:
                raise ShapeError(message(f"global_values[{name!r}]", f"shape {shape} (the guide's draw of the "
                                         f"global site {name!r})", f"shape {tuple(value.shape)}",
                                         f"pass a tensor of shape {shape} for {name!r}, or drop it to hold the "
                                         "guide's draw"))
    missing = [n for n in structure.global_sites if n not in values]
    if missing:
        _, model_trace = trace_guide_and_model(poutine.condition(pair.model, data=dict(values)),
                                               poutine.condition(pair.guide, data=dict(values)), first, **context)
        values.update({n: cast(torch.Tensor, model_trace.nodes[n]["value"]) for n in missing})
    source = None
    if structure.global_sites:
        source = "given" if not missing else ("guide" if len(missing) == len(structure.global_sites)
                                              else "given+guide")
    model = poutine.condition(pair.model, data=values)
    guide = poutine.condition(pair.guide, data=values)
    return _HeldGlobals(model, guide, values, source, particle_plate_dim(model, guide, first, **context))


def _pair_device(pair: ModelGuidePair, x: torch.Tensor) -> torch.device:
    return next((t.device for t in (*pair.parameters(), *pair.buffers())), x.device)


class _PairData(NamedTuple):
    """What both estimates of a model/guide pair read off its data ``x`` (``(N, ...)``) before the batches."""

    device: torch.device  # the pair's (of its first parameter or buffer; x's without either)
    context: dict[str, Any]  # the checked context of all N points
    first: torch.Tensor  # the first batch, on the device
    first_rows: dict[str, Any]  # its context rows
    structure: PairStructure  # read off a trace of the first batch


def _pair_data(pair: ModelGuidePair, x: torch.Tensor, batch_size: int, context: Mapping[str, Any] | None) -> _PairData:
    device = _pair_device(pair, x)
    n = x.shape[0]
    ctx = check_context("context", context, n, declared_shapes(pair), device)
    first = x[:batch_size].to(device)
    first_rows = context_rows(ctx, n, slice(0, batch_size))
    return _PairData(device, ctx, first, first_rows, pair_structure(pair, first, context=first_rows))


def _pair_log_likelihood(pair: ModelGuidePair, data: Any, num_samples: int, batch_size: int,
                         chunk_size: int | None, return_log_weights: bool,
                         given: Mapping[str, Any] | None, context: Mapping[str, Any] | None) -> LogLikelihood:
    """:func:`log_likelihood` of a model/guide pair, its globals held fixed."""
    x = as_data_rows(pair, data, "data")
    num_samples = integer("num_samples", num_samples)
    batch_size = integer("batch_size", batch_size)
    n = x.shape[0]
    device, ctx, first, first_rows, structure = _pair_data(pair, x, batch_size, context)
    was_training = pair.training
    pair.eval()

    def log_weights(model: Callable, guide: Callable, xb: torch.Tensor) -> Iterator[torch.Tensor]:
        k = sample_chunk_size(num_samples, xb.shape[0], tuple(x.shape[1:]), chunk_size)
        for start in range(0, num_samples, k):
            yield _pair_particles(model, guide, xb, min(k, num_samples - start), held.particle_dim,
                                  structure.data_plate).log_w

    def batches() -> Iterator[tuple[torch.Tensor, Iterator[torch.Tensor]]]:
        for i in range(0, n, batch_size):
            xb = x[i: i + batch_size].to(device)
            rows = context_rows(ctx, n, slice(i, i + batch_size))
            yield xb, log_weights(_with_context(held.model, rows), _with_context(held.guide, rows), xb)

    try:
        with torch.no_grad(), unit_kl_weight(pair), plate_clash_explained():
            held = _held_globals(pair, structure, first, given, first_rows)
            global_values = {n: v.detach().cpu() for n, v in held.values.items()} if held.source else None
            return _importance_log_likelihood(batches(), num_samples, return_log_weights, global_values, held.source)
    finally:
        pair.train(was_training)


# ------------------------------------------------------------------------------------------ diagnostics
PARETO_K_MIN_SAMPLES = 30
"""Fewest importance samples per data point for which :func:`pareto_k` fits a tail: ArviZ 1.x fits
``floor(K / 5)`` tail weights, raises below 25 draws and returns NaN up to 29 (a 5-weight tail has no
first quartile above its minimum); ArviZ 0.x returns ``inf`` below 21. From 30 both fit at least 6."""


def _arviz():
    """The installed ``arviz``: 0.x, or 1.x (the namespace over arviz-base, arviz-stats, arviz-plots)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def _arviz_major() -> int:
    return int(str(_arviz().__version__).split(".")[0])


def _psis_k(lw: np.ndarray) -> np.ndarray:
    """``(N,)`` PSIS shape estimates of ``(N, K)`` float64 log weights, through the installed ArviZ's
    public PSIS: ``arviz.psislw`` (0.x) takes log importance weights; ``arviz_stats`` 1.x's
    ``array_stats.psislw`` takes log-likelihoods (LOO's log ratios are their negatives), so the weights
    go in negated. It raises where the tail weights are all equal, for the whole batch: rows then go
    one at a time and such a row gets ``inf``, as 0.x gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _arviz_major() < 1:
            return np.asarray(_arviz().psislw(lw.copy())[1], dtype=np.float64)
        from arviz_stats.base import array_stats

        try:
            return np.asarray(array_stats.psislw(-lw, r_eff=1.0, axis=-1)[1], dtype=np.float64)
        except ValueError as e:
            if "tail values are the same" not in str(e):
                raise
            if lw.shape[0] == 1:
                return np.array([np.inf])
            return np.concatenate([_psis_k(row[None]) for row in lw])


def pareto_k(log_weights: torch.Tensor) -> torch.Tensor:
    """Pareto-k of each row of ``(N, K)`` log importance weights ``log p(x_n, z_k) - log q(z_k | x_n)``
    (Yao et al. 2018, "Yes, but did it work?: Evaluating variational inference"; Vehtari et al. 2024,
    "Pareto smoothed importance sampling"): the shape of a generalized Pareto fit to the largest weights,
    through the installed ArviZ's PSIS (``arviz.psislw`` on 0.x, ``arviz_stats`` on 1.x). Returns ``(N,)``
    float32, dimensionless.

    ``k < 0.5``: the importance-sampled estimate is reliable; ``0.5 <= k < 0.7``: usable but slow to
    converge; ``k > 0.7``: the guide misses mass of the posterior and ``log p(x)`` is unreliable for that point.

    Rows whose weights are all equal (every weight the same, the estimate exact) get ``-inf``, on both ArviZ
    lines. Equal means equal up to the rounding of the log weights' floating-point type: a row counts as equal
    where ``max_k log w_k - min_k log w_k <= 64 eps max(1, max_k |log w_k|)``, ``eps`` the machine epsilon of
    ``log_weights``' dtype (float32: ``1.2e-7``, so ``7.6e-6`` nats per nat of magnitude; float64: ``2.2e-16``),
    i.e. the log weights agree to within 64 to 128 units in the last place of their magnitude. Log densities
    are sums of many rounded terms, often larger than the log weight itself: at the exact posterior of
    :func:`pyro_vae.models.linear_gaussian.linear_gaussian_vae` (every weight ``p(x)``) float32 log weights
    spread by up to about 20 ``eps`` times their magnitude, a spread PSIS would otherwise fit as a tail
    (finite ``k``, or ``inf`` where the largest weights tie). Rows spreading by more are fitted as they are.
    Where the tail fit fails, ``k`` is ``inf`` (unreliable) on both: 0.x returns ``inf``
    itself, 1.x returns NaN or raises (largest weights all equal, or spanning more than about 700 nats),
    which becomes ``inf``. Both lines fit the ``M`` largest of ``K`` weights, 0.x with
    ``M = ceil(min(K / 5, 3 sqrt(K)))`` (as R's loo), 1.x with ``M = floor(K / 5)`` for ``K <= 225`` and
    ``floor(3 sqrt(K))`` above. So for weights without ties they give the same ``k`` (to float32) when
    ``K`` is a multiple of 5 from 30 to 225; at other ``K`` (1000, the command line's default, included)
    they are two estimates of the same shape from tails one weight apart, and differ by the fit's noise
    (a few hundredths at ``K = 1000``). Ties among the largest weights (discrete latents) are fitted
    differently (0.x keeps the weights strictly above the cutoff, 1.x the ``M`` largest), and ``k`` can
    differ more there.

    Raises:
        ConfigError: ``log_weights`` is not ``(N, K)`` or has ``K < PARETO_K_MIN_SAMPLES`` (30) samples.
        DataError: a row of ``log_weights`` holds NaN or ``+inf``, or only ``-inf``.
    """
    lw = log_weights.detach().cpu().double()
    if lw.dim() != 2 or lw.shape[1] < PARETO_K_MIN_SAMPLES:
        raise ConfigError(message(
            "log_weights", f"an (N, K) tensor with K >= {PARETO_K_MIN_SAMPLES} importance samples per data point "
            "(the Pareto fit needs at least 6 tail weights)", f"shape {tuple(lw.shape)}",
            f"draw num_samples >= {PARETO_K_MIN_SAMPLES} (pyro-vae evaluate: --iw-samples >= {PARETO_K_MIN_SAMPLES})"))
    bad = (torch.isnan(lw) | (lw == math.inf)).any(1) | (lw.amax(1) == -math.inf)
    if bool(bad.any()):
        raise DataError(message("log_weights", "finite log weights (-inf only for some zero weights)",
                                f"NaN, +inf or only -inf in {int(bad.sum())} of {lw.shape[0]} rows",
                                "check the model's and the guide's log densities at those data points"))
    eps = torch.finfo(log_weights.dtype if log_weights.is_floating_point() else torch.float64).eps
    # -inf (a zero weight) beside finite weights varies: the magnitude is taken over the finite ones only
    magnitude = lw.abs().masked_fill(lw == -math.inf, 0.0).amax(1).clamp(min=1.0)
    k = torch.full((lw.shape[0],), -math.inf, dtype=torch.float64)
    varies = (lw.amax(1) - lw.amin(1) > 64 * eps * magnitude) | (lw.amin(1) == -math.inf)
    if bool(varies.any()):
        fitted = torch.as_tensor(_psis_k(lw[varies].numpy()), dtype=torch.float64)
        k[varies] = torch.where(torch.isnan(fitted), torch.full_like(fitted, math.inf), fitted)
    return k.float()


def posterior_means(vae: VAE, data: Any, *, batch_size: int = 1024, num_samples: int = 64,
                    context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The posterior's location for every data point, ``(N, *latent_event_shape)``, in the latent site's
    representation: ``E_q[z | x]`` (the guide distribution's mean, or a Monte Carlo mean of ``num_samples``
    guide draws where the distribution has none); for a log-space categorical guide
    (:class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical`) the log class probabilities ``log q(c | x)``,
    the log of the mean of the categorical it relaxes (``.exp()`` gives the probabilities), as
    :meth:`pyro_vae.VAE.encode`.

    ``context``: the data's named context, passed to the guide as keyword arguments (a tensor whose first
    dimension is ``N`` per data point, each batch given its rows; other values whole), as in
    :func:`log_likelihood`."""
    x = as_data_set(vae, data)
    device = vae.device
    n = x.shape[0]
    ctx = check_context("context", context, n, declared_shapes(vae), device)
    means = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            xb = x[i: i + batch_size].to(device)
            rows = context_rows(ctx, n, slice(i, i + batch_size))
            q = cast(dist.TorchDistribution,
                     poutine.trace(vae.guide).get_trace(xb, **rows).nodes[vae.site("z")]["fn"])
            m = log_class_probs(q)
            if m is None:
                try:
                    m = q.mean
                except NotImplementedError:
                    m = q.sample((num_samples,)).mean(0)
            means.append(m.reshape(xb.shape[0], *q.event_shape).cpu())
    return torch.cat(means)


def latent_variances(vae: VAE, data: Any, *, batch_size: int = 1024,
                     context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``Cov_x(E_q[z_j | x])`` for each latent entry ``j`` (flattened), ``(prod(latent_event_shape),)``; for a
    categorical latent, of the class probabilities ``q(c | x)`` (the ``exp`` of :func:`posterior_means`, whose
    ``context`` this takes)."""
    m = posterior_means(vae, data, batch_size=batch_size, context=context)
    if getattr(vae, "categories", None) is not None:
        m = m.exp()
    m = m.reshape(m.shape[0], -1)
    if m.shape[0] < 2:
        raise DataError(message("data", "at least 2 data points", f"{m.shape[0]}", "pass more data points"))
    return m.var(dim=0)


def active_units(vae: VAE, data: Any, threshold: float = 0.01, *, batch_size: int = 1024,
                 context: Mapping[str, Any] | None = None) -> int:
    """Number of active latent units (Burda et al. 2016, Sec. 5.2): entries ``j`` with
    ``Cov_x(E_q[z_j | x]) > threshold``. Few active units mean posterior collapse. ``context``: as
    :func:`posterior_means`."""
    return int((latent_variances(vae, data, batch_size=batch_size, context=context) > threshold).sum())


def to_inference_data(vae: VAE | ModelGuidePair | Any, data: Any, num_samples: int = 100, *, resample: bool = False,
                      seed: int | None = None, batch_size: int = 256, global_values: Mapping[str, Any] | None = None,
                      context: Mapping[str, Any] | None = None):
    """Posterior draws of ``z`` for the given data points in ArviZ's container: an
    ``arviz.InferenceData`` with ArviZ 0.x, an ``xarray.DataTree`` with ArviZ 1.x (whose ``from_dict``
    returns one). Both are read the same way (``idata.posterior["z"]``, ``idata.attrs["pareto_k"]``) and
    hold the same groups, variables, dims and attrs.

    Groups: ``posterior`` (``z``, dims ``(chain, draw, point, latent[, category])``; for a categorical latent
    the site's log-space values, ``exp`` gives the relaxed one-hot points), ``log_likelihood``
    (``x``: ``log p(x_n | z)`` per draw, nats), ``sample_stats`` (``log_weight``:
    ``log p(x_n, z) - log q(z | x_n)`` per draw, nats) and ``observed_data`` (``x`` flattened, dims
    ``(point, entry)``); ``chain`` has length 1 and ``draw`` length ``num_samples``. ``attrs`` hold the
    importance-sampled ``log_likelihood`` per point (nats, from the drawn samples), the Pareto-k values
    (:func:`pareto_k`), ``num_samples`` and ``resampled`` (0 or 1). ``az.summary`` works on it with
    either line, ``az.plot_posterior`` (0.x) and ``az.plot_dist`` (1.x) draw ``z``; ``az.plot_khat`` takes
    the ``pareto_k`` array with 0.x only (1.x's takes a LOO result), :func:`pyro_vae.plots.save_pareto_k`
    draws it with both.

    Args:
        num_samples: draws per data point from the guide ``q(z | x)``, at least
            ``PARETO_K_MIN_SAMPLES`` (30) for the Pareto-k fit.
        resample: replace the draws by sampling-importance-resampling draws (closer to the exact
            posterior ``p(z | x)``; ``log_weight`` then refers to the original draws).
        seed: seeds Pyro before drawing.
        batch_size: data points traced at once (all ``num_samples`` draws of a batch are held together).
        global_values: for a model/guide pair, point values of global latent sites (as :func:`log_likelihood`).
        context: the data's named context, passed to the model and guide as keyword arguments, its
            per-data-point rows following the points (as :func:`log_likelihood`).

    ``vae`` may be any model/guide pair (:class:`pyro_vae.ModelGuidePair`; ``data`` ``(N, ...)``). Its global
    latents are held fixed as :func:`log_likelihood` holds them (``global_values``, else one guide draw), and go
    into the ``constant_data`` group; ``posterior`` holds one variable per local latent site (the model's latent
    sites inside the data plate), named by the site with ``/`` written ``.`` (``"vae/z"`` is ``"vae.z"``), dims
    ``(chain, draw, point, <site>_dim_0, ...)`` (the site's other plate dimensions, then its event dimensions);
    ``x`` of ``log_likelihood`` sums the observed sites inside the data plate; ``attrs`` add ``global_source``.

    Raises:
        ConfigError: ``num_samples`` is not an integer >= 30, or ``batch_size`` not >= 1; ``global_values``
            with a VAE or naming a site that is not a global latent of the pair.
        ShapeError: a ``global_values`` value whose shape is not that of the guide's draw of its site.
        DataError: ``data`` does not have the VAE's data shape.
    """
    vae = as_pair(vae)
    if isinstance(vae, ModelGuidePair):
        return _pair_inference_data(vae, data, num_samples, resample, seed, batch_size, global_values, context)
    if global_values:
        raise ConfigError(message("global_values", "none for a VAE (it has no global latents)",
                                  f"values for {sorted(global_values)}", "drop global_values"))
    az = _arviz()
    x = as_data_set(vae, data)
    num_samples = integer("num_samples", num_samples, PARETO_K_MIN_SAMPLES)
    if seed is not None:
        pyro.set_rng_seed(seed)
    batch_size = integer("batch_size", batch_size)
    device = vae.device
    n = x.shape[0]
    ctx = check_context("context", context, n, declared_shapes(vae), device)
    parts = []
    with torch.no_grad():
        first = context_rows(ctx, n, slice(0, batch_size))
        particle_dim = particle_plate_dim(_with_context(vae.model, first), _with_context(vae.guide, first),
                                          x[:batch_size].to(device))
        for i in range(0, n, batch_size):
            rows = context_rows(ctx, n, slice(i, i + batch_size))
            out = particle_log_probs(vae, _with_context(vae.model, rows), _with_context(vae.guide, rows),
                                     x[i: i + batch_size].to(device), num_samples, particle_dim, keep=("z",))
            assert out.z is not None  # kept
            parts.append((out.z.cpu(), out.log_w.cpu(), out.log_p_obs.cpu()))
    z, log_w, log_px = (torch.cat(p, dim=1) for p in zip(*parts))  # (S, N, ...), (S, N), (S, N)
    if resample:
        idx = torch.distributions.Categorical(logits=log_w.T).sample((num_samples,))  # (S, N)
        z = torch.gather(z, 0, idx.reshape(*idx.shape, *([1] * (z.dim() - 2))).expand_as(z))
        log_px = torch.gather(log_px, 0, idx)
    event = z.shape[2:]
    latent_dims = (["latent", "category"][: len(event)] if len(event) <= 2
                   else [f"latent_{i}" for i in range(len(event))])
    kss = pareto_k(log_w.T)
    ll = log_w.logsumexp(0) - math.log(num_samples)
    groups = {"posterior": {"z": z.unsqueeze(0).numpy()},
              "log_likelihood": {"x": log_px.unsqueeze(0).numpy()},
              "sample_stats": {"log_weight": log_w.unsqueeze(0).numpy()},
              "observed_data": {"x": x.reshape(x.shape[0], -1).numpy()}}
    dims = {"z": ["point", *latent_dims], "x": ["point", "entry"], "log_weight": ["point"]}
    attrs = {"log_likelihood": ll.tolist(), "pareto_k": kss.tolist(), "num_samples": num_samples,
             "resampled": int(resample)}
    if _arviz_major() < 1:
        return az.from_dict(**groups, dims=dims, attrs=attrs)
    return az.from_dict(groups, dims=dims, attrs={"/": attrs})


def _pair_inference_data(pair: ModelGuidePair, data: Any, num_samples: int, resample: bool, seed: int | None,
                         batch_size: int, given: Mapping[str, Any] | None, context: Mapping[str, Any] | None) -> Any:
    """:func:`to_inference_data` of a model/guide pair, its globals held fixed."""
    az = _arviz()
    x = as_data_rows(pair, data, "data")
    num_samples = integer("num_samples", num_samples, PARETO_K_MIN_SAMPLES)
    if seed is not None:
        pyro.set_rng_seed(seed)
    batch_size = integer("batch_size", batch_size)
    n = x.shape[0]
    device, ctx, first, first_rows, structure = _pair_data(pair, x, batch_size, context)
    was_training = pair.training
    pair.eval()
    parts = []
    try:
        with torch.no_grad(), unit_kl_weight(pair), plate_clash_explained():
            held = _held_globals(pair, structure, first, given, first_rows)
            for i in range(0, n, batch_size):
                rows = context_rows(ctx, n, slice(i, i + batch_size))
                out = _pair_particles(_with_context(held.model, rows), _with_context(held.guide, rows),
                                      x[i: i + batch_size].to(device), num_samples, held.particle_dim,
                                      structure.data_plate, keep=structure.local_sites)
                parts.append(({n: v.cpu() for n, v in out.latents.items()}, out.log_w.cpu(), out.log_p_obs.cpu()))
    finally:
        pair.train(was_training)
    latents = {n: torch.cat([p[0][n] for p in parts], dim=1) for n in structure.local_sites}  # (S, N, ...)
    log_w, log_px = torch.cat([p[1] for p in parts], dim=1), torch.cat([p[2] for p in parts], dim=1)  # (S, N)
    if resample:
        idx = torch.distributions.Categorical(logits=log_w.T).sample((num_samples,))  # (S, N)
        latents = {n: torch.gather(v, 0, idx.reshape(*idx.shape, *([1] * (v.dim() - 2))).expand_as(v))
                   for n, v in latents.items()}
        log_px = torch.gather(log_px, 0, idx)
    names = {n: n.replace("/", ".") for n in (*structure.local_sites, *held.values)}
    groups: dict[str, Any] = {
        "posterior": {names[n]: v.unsqueeze(0).numpy() for n, v in latents.items()},
        "log_likelihood": {"x": log_px.unsqueeze(0).numpy()},
        "sample_stats": {"log_weight": log_w.unsqueeze(0).numpy()},
        "observed_data": {"x": x.reshape(x.shape[0], -1).numpy()}}
    dims = {names[n]: ["point", *(f"{names[n]}_dim_{i}" for i in range(v.dim() - 2))] for n, v in latents.items()}
    dims.update({"x": ["point", "entry"], "log_weight": ["point"]})
    if held.values:
        groups["constant_data"] = {names[n]: v.detach().cpu().numpy() for n, v in held.values.items()}
        dims.update({names[n]: [f"{names[n]}_dim_{i}" for i in range(v.dim())] for n, v in held.values.items()})
    attrs = {"log_likelihood": (log_w.logsumexp(0) - math.log(num_samples)).tolist(),
             "pareto_k": pareto_k(log_w.T).tolist(), "num_samples": num_samples, "resampled": int(resample)}
    if held.source is not None:
        attrs["global_source"] = held.source
    if _arviz_major() < 1:
        return az.from_dict(**groups, dims=dims, attrs=attrs)
    return az.from_dict(groups, dims=dims, attrs={"/": attrs})


# ----------------------------------------------------------------------------------- amortization gap
@dataclass
class AmortizationGap:
    """Per-data-point ELBOs of the encoder's guide and of a guide optimized for each point alone
    (Cremer et al. 2018, "Inference Suboptimality in Variational Autoencoders"), nats per data point.

    ``gap = elbo_optimized - elbo_amortized`` (>= 0 up to noise) is the amortization gap; the rest of the
    inference gap, ``log p(x) - elbo_optimized``, is the approximation gap of the Gaussian family.
    """

    elbo_amortized: torch.Tensor
    elbo_optimized: torch.Tensor
    num_steps: int

    @property
    def gap_per_point(self) -> torch.Tensor:
        """``(N,)`` amortization gap of each data point, ``elbo_optimized - elbo_amortized`` (nats)."""
        return self.elbo_optimized - self.elbo_amortized

    @property
    def gap(self) -> float:
        """Mean of :attr:`gap_per_point` (nats per data point)."""
        return float(self.gap_per_point.mean())

    @property
    def gap_se(self) -> float:
        """Standard error of :attr:`gap` over the data points (``std / sqrt(N)``, nats; NaN for ``N < 2``)."""
        return _standard_error(self.gap_per_point)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary: the mean gap and its standard error, the mean ELBO of each guide (nats per
        data point), the number of points and the optimization steps."""
        return {"amortization_gap": self.gap, "amortization_gap_se": self.gap_se,
                "elbo_amortized": float(self.elbo_amortized.mean()),
                "elbo_optimized": float(self.elbo_optimized.mean()), "amortization_points": len(self.gap_per_point),
                "amortization_steps": self.num_steps}


def _local_guide(vae: VAE, loc: torch.Tensor, raw: torch.Tensor, min_scale: float) -> Callable:
    def guide(x: torch.Tensor, num_data: int | None = None, batch_size: int | None = None,
              **context: Any) -> torch.Tensor:  # the per-point guide takes the context and does not use it
        with vae.plate(x.shape[0], None, x.device), vae.kl_scale():
            return pyro.sample(vae.site("z"), dist.Normal(loc, F.softplus(raw) + min_scale).to_event(1))

    return guide


def amortization_gap(vae: VAE, data: Any, *, num_steps: int = 300, lr: float = 1e-2, num_particles: int = 8,
                     num_eval_samples: int = 256, seed: int | None = 0,
                     context: Mapping[str, Any] | None = None) -> AmortizationGap:
    """Optimize a separate Gaussian guide ``N(m_n, diag(s_n^2))`` for each data point, starting from the
    encoder's output, with the decoder and prior fixed (Adam on Pyro's vectorized ``Trace_ELBO``), and
    compare its ELBO with the encoder's (Cremer et al. 2018).

    Args:
        data: ``(N, *data_shape)``: the points (a few hundred at most; all are optimized at once).
        num_steps, lr: Adam steps and learning rate of the per-point optimization.
        num_particles: Monte Carlo particles per step.
        num_eval_samples: samples per point for the final ELBO estimates.
        seed: seeds Pyro first (``None``: leave the RNG alone).
        context: the points' named context, passed to the model, the encoder and the per-point guide as keyword
            arguments (per-data-point values one row per point, as in :func:`log_likelihood`).

    Needs a Gaussian encoder (:class:`pyro_vae.GaussianEncoder`).
    """
    _vae_only(vae)
    if not isinstance(vae.encoder, GaussianEncoder):
        raise ConfigError(message("vae.encoder", "a GaussianEncoder (the per-point guide is Gaussian)",
                                  type(vae.encoder).__name__, "use the amortization gap with Gaussian latents"))
    num_steps = integer("num_steps", num_steps, 0)
    num_particles = integer("num_particles", num_particles)
    if seed is not None:
        pyro.set_rng_seed(seed)
    x = as_data_set(vae, data).to(vae.device)
    ctx = check_context("context", context, x.shape[0], declared_shapes(vae), vae.device)
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            loc0, scale0 = vae.encoder(x, **vae.part_context("encoder", ctx))
        min_scale = vae.encoder.min_scale
        loc = loc0.detach().clone().requires_grad_(True)
        raw = torch.log(torch.expm1((scale0 - min_scale).clamp_min(1e-6))).detach().clone().requires_grad_(True)
        guide = _local_guide(vae, loc, raw, min_scale)
        nesting = max_plate_nesting(vae.model, guide, x, **ctx)
        loss_fn = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                             max_plate_nesting=nesting)
        opt = torch.optim.Adam([loc, raw], lr=lr)
        for _ in range(num_steps):
            with unit_kl_weight(vae):  # the ELBO itself, whatever the KL weight the VAE trained with
                loss = loss_fn.differentiable_loss(vae.model, guide, x, **ctx)
            grads = torch.autograd.grad(loss, [loc, raw])
            opt.zero_grad()
            loc.grad, raw.grad = grads
            opt.step()
        amortized = log_likelihood(vae, x, num_eval_samples, batch_size=x.shape[0], context=ctx).elbo_per_point
        optimized = log_likelihood(vae, x, num_eval_samples, batch_size=x.shape[0], guide=guide,
                                   context=ctx).elbo_per_point
    finally:
        vae.train(was_training)
    return AmortizationGap(elbo_amortized=amortized, elbo_optimized=optimized, num_steps=num_steps)
