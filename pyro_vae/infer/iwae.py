"""The importance-weighted bound (IWAE; Burda, Grosse & Salakhutdinov 2016) as a training objective.

With ``K`` draws ``z_1..z_K ~ q(z | x)`` of the guide for a data point ``x`` and the importance weights
``w_k = p(x, z_k) / q(z_k | x)``, the bound

    L_K(x) = E[ log (1/K) sum_k w_k ]

lies between the ELBO (``K = 1``) and ``log p(x)``, grows with ``K`` and is ``log p(x)`` when ``q`` is the exact
posterior (every weight is then ``p(x)``). Renyi's bound of order ``alpha`` (Li & Turner 2016),
``1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha)``, is the same construction; ``alpha = 0`` is the IWAE bound.

:class:`ImportanceWeightedELBO` is a Pyro ``ELBO``: ``pyro.infer.SVI(model, guide, optim,
ImportanceWeightedELBO(num_particles=K))`` trains any model/guide pair whose latent sites all lie inside the
data plate, the outermost plate that encloses every observed site (``"data"`` of a :class:`pyro_vae.VAE`);
a global latent outside it is refused, naming the site. The ``K`` draws are vectorized in an outer plate;
every site's log-density is summed over its plates other than those enclosing every site (so a nested plate,
e.g. over pixels, is part of one data point's weight), the log-mean-exp over ``K`` is taken for each data
point, and the data points' bounds are summed and multiplied by the data plate's minibatch scale
``num_data / batch``, as ``Trace_ELBO`` scales its sum (Pyro 1.9's ``RenyiELBO`` applies that scale to each
log weight inside the log-mean-exp instead, and joins the data points of a model with a global latent into
one weight without a word).
A site's log-density enters the weight multiplied by its scale relative to that minibatch scale: the KL
weight ``beta`` of a :class:`pyro_vae.VAE`'s latent site (``beta != 1`` gives the weight
``p(x | z) (p(z) / q(z | x))^beta``), 1 otherwise.

Gradients (one surrogate, differentiated by ``loss_and_grads``):

- ``estimator="pathwise"``: the gradient of the bound's estimate itself, ``sum_k w~_k grad log w_k`` with
  the normalized weights ``w~ = softmax((1 - alpha) log w)`` over ``k`` (Burda et al. 2016, Eq. 14);
- ``estimator="dreg"``: the doubly reparameterized gradient (Tucker et al. 2019): the model's parameters get
  the gradient above, the guide's get ``sum_k c_k d/dz_k (log p(x, z_k) - log q_stop(z_k)) dz_k/dphi``
  with ``log q_stop`` the guide's log-density under detached parameters
  (:class:`~pyro_vae.infer.path_gradient.PathGradient`) and ``c_k = alpha w~_k + (1 - alpha) w~_k^2``
  (``w~_k^2`` for the IWAE bound; ``1/K``, i.e. sticking the landing, for the ELBO at ``alpha = 1``). The
  model is run a second time on detached draws to separate the two, about twice the decoder's cost.

Guide sites without ``rsample`` (a score-function term) are refused, except under ``estimator="vimco"``
(:mod:`pyro_vae.infer.vimco`; Mnih & Rezende 2016), which adds to the surrogate the learning signal
``sum_k (L - L_{-k}) log q(z_k)`` of each such site, ``L_{-k}`` the leave-one-out bound (``K >= 2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_site_shape, warn_if_nan

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.estimators import Estimator, EstimatorMessenger, get_estimator
from pyro_vae.infer.vimco import vimco_learning_signals
from pyro_vae.validation import integer, number

__all__ = ["ImportanceWeightedELBO", "PARTICLE_PLATE", "importance_weighted_terms", "iwae_traces",
           "detached_values"]

PARTICLE_PLATE = "num_particles_vectorized"
"""Name of the plate over the ``K`` importance samples (the name Pyro's vectorized particles use)."""


def detached_values(trace: Trace) -> Trace:
    """A trace holding ``trace``'s sample sites with detached values, to replay a model against: its
    log-densities then depend on the model's parameters only, not on the guide's draws."""
    out = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            value = site["value"]
            out.add_node(name, **{**site, "value": value.detach() if torch.is_tensor(value) else value})
    return out


def iwae_traces(model: Callable, guide: Callable, args: tuple, kwargs: dict, *, detached_model: bool = False,
                max_plate_nesting: float = float("inf")) -> tuple[Trace, Trace, Trace | None]:
    """``(model_trace, guide_trace, detached_model_trace)`` of callables already wrapped in the particle plate:
    the guide traced, the model replayed against it and, with ``detached_model``, replayed once more against
    the guide's detached draws (:func:`detached_values`; ``None`` otherwise). Subsample sites are pruned,
    ``log_prob`` (model) and ``score_parts`` (guide) computed; under Pyro's validation the site shapes are
    checked against ``max_plate_nesting`` as Pyro's ELBOs check them."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    stopped = None
    if detached_model:
        stopped = poutine.trace(poutine.replay(model, trace=detached_values(guide_trace))).get_trace(
            *args, **kwargs)
        stopped = prune_subsample_sites(stopped)
        stopped.compute_log_prob()
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    if is_validation_enabled():
        check_if_enumerated(guide_trace)
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting)  # type: ignore[arg-type]  # inf is allowed
    return model_trace, guide_trace, stopped


def _frames(site: Any) -> set[tuple[str, int]]:
    return {(f.name, f.dim) for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}


def _data_plates(model_trace: Trace, guide_trace: Trace) -> tuple[set[tuple[str, int]], float]:
    """The plates of the per-data-point bounds (``(name, dim)``, those enclosing every sample site) and their
    minibatch scale.

    Raises:
        ConfigError: a latent site outside the data plate, the outermost plate that encloses every observed
            site (a global latent), naming the site."""
    observed = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        return set(), 1.0
    common = set.intersection(*(_frames(s) for s in observed))
    outer = [(f.name, f.dim) for f in observed[0]["cond_indep_stack"] if (f.name, f.dim) in common]
    sites = [(role, name, s) for role, tr in (("model", model_trace), ("guide", guide_trace))
             for name, s in tr.nodes.items() if s["type"] == "sample"]
    if outer:
        for role, name, site in sites:
            if outer[0] not in _frames(site):
                raise ConfigError(message(
                    f'{role} site "{name}"',
                    f'a site inside the data plate "{outer[0][0]}" that encloses every observed site (the bound is '
                    "one log-mean-exp of importance weights per data point)", "a site outside it (a global latent)",
                    "train global latents with Trace_ELBO, or make them parameters (pyro.param)"))
    plates = set.intersection(*(_frames(s) for _, _, s in sites))
    scale = 1.0
    for f in observed[0]["cond_indep_stack"]:
        if (f.name, f.dim) in plates and f.full_size is not None and f.size:
            scale *= f.full_size / f.size
    return plates, scale


def _reduce(log_p: Any, keep: set[int], nd: int) -> torch.Tensor:
    """``log_p`` summed over every batch dimension (of ``nd``, counted from the right) outside ``keep``."""
    log_p = torch.as_tensor(log_p)
    if log_p.dim() < nd:
        log_p = log_p.reshape((1,) * (nd - log_p.dim()) + tuple(log_p.shape))
    other = [d for d in range(-log_p.dim(), 0) if d not in keep]
    return log_p.sum(dim=other, keepdim=True) if other else log_p


def importance_weighted_terms(model_trace: Trace, guide_trace: Trace, particle_dim: int, alpha: float = 0.0,
                              detached_model_trace: Trace | None = None,
                              learning_signals: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bound, surrogate)`` of one set of ``K`` importance samples (traces of :func:`iwae_traces`).

    ``bound`` is the detached estimate of the bound for the whole batch (nats, scaled to ``num_data`` like
    ``Trace_ELBO``); ``surrogate`` equals it in value and its gradient is the estimator's: the bound's own
    gradient, or with ``detached_model_trace`` the doubly reparameterized one (the guide's sites must then be
    :class:`~pyro_vae.infer.path_gradient.PathGradient`: their ``score_parts`` entropy term is ``log q_stop``).
    With ``learning_signals`` (VIMCO), guide sites with a score-function term are taken and the surrogate adds
    ``sum_k (L - L_{-k}) log q(z_k)`` for them (:func:`pyro_vae.infer.vimco.vimco_learning_signals`).

    Raises:
        ConfigError: a latent site outside the data plates (a global latent), or a guide site with a
            score-function term without ``learning_signals``, naming the site; ``learning_signals`` with a
            score-function site but fewer than two importance samples (VIMCO's leave-one-out signal needs
            ``K >= 2``; the term is never dropped).
    """
    plates, scale = _data_plates(model_trace, guide_trace)
    keep = {particle_dim, *(d for _, d in plates)}
    nd = -particle_dim
    model_lp: Any = 0.0
    guide_lp: Any = 0.0
    guide_stop: Any = 0.0
    score_lp: Any = 0.0
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if role == "model":
                model_lp = model_lp + _reduce(site["log_prob"], keep, nd) / scale
                continue
            _, score, entropy = site["score_parts"]
            if not is_identically_zero(score) and learning_signals:
                score_lp = score_lp + _reduce(score, keep, nd)  # Pyro never scales score_function
            elif not is_identically_zero(score):
                raise ConfigError(message(
                    f'guide site "{name}"', "a reparameterized guide site for the IWAE bound",
                    f"{type(site['fn']).__name__} with a score-function term",
                    'for a discrete site, pass estimator="vimco" (make_elbo("iwae", K, "vimco")); else use a '
                    'reparameterized guide (or a relaxed latent), or train with elbo="trace"'))
            guide_lp = guide_lp + _reduce(site["log_prob"], keep, nd) / scale
            if detached_model_trace is not None:
                guide_stop = guide_stop + _reduce(entropy, keep, nd) / scale
    log_w = torch.as_tensor(model_lp - guide_lp)
    k = log_w.shape[particle_dim] if log_w.dim() >= nd else 1
    a = 1.0 - alpha
    per_point = (torch.logsumexp(a * log_w, dim=particle_dim) - math.log(k)) / a
    bound = scale * per_point.sum()
    if learning_signals and torch.is_tensor(score_lp):
        if log_w.dim() < nd or k < 2:
            raise ConfigError(message(
                "the importance samples of VIMCO", f"K >= 2 importance samples along dim {particle_dim}",
                f"{k} sample(s), log-weights of shape {tuple(log_w.shape)}",
                "trace the model and guide under a particle plate of size K >= 2 (make_elbo(\"iwae\", K, "
                "\"vimco\") with K >= 2)"))
        signal = scale * (vimco_learning_signals(log_w, particle_dim, alpha) * score_lp).sum()
        bound = bound + (signal - signal.detach())
    if detached_model_trace is None:
        return bound.detach(), bound
    stopped_lp: Any = 0.0
    for site in detached_model_trace.nodes.values():
        if site["type"] == "sample":
            stopped_lp = stopped_lp + _reduce(site["log_prob"], keep, nd) / scale
    w = torch.softmax(a * log_w.detach(), dim=particle_dim)
    c = alpha * w + a * w.pow(2)
    terms = w * stopped_lp + c * (model_lp - stopped_lp - guide_stop)
    surrogate = scale * terms.sum()
    return bound.detach(), surrogate + (bound - surrogate).detach()


class ImportanceWeightedELBO(ELBO):
    """The importance-weighted bound of order ``alpha`` (module docstring) as a Pyro ELBO, its ``K`` importance
    samples vectorized in an outer plate.

    ``loss`` is the negative bound for the batch in nats (a Python float), scaled to ``num_data`` like
    ``Trace_ELBO``'s; ``loss_and_grads`` also backpropagates the estimator's surrogate;
    ``differentiable_loss`` returns the negative surrogate (equal to the loss in value).
    :meth:`loss_and_surrogate` gives both as tensors without host synchronization.

    Args:
        num_particles: ``K``, the importance samples per data point (an integer >= 1; ``K = 1`` is the ELBO).
        alpha: the order, ``0 <= alpha < 1`` (0: the IWAE bound).
        estimator: ``"pathwise"`` (the bound's own gradient), ``"dreg"``, or another estimator whose
            ``objectives`` include ``"iwae"`` (see :data:`pyro_vae.infer.estimators.ESTIMATORS`).
        max_plate_nesting: plates of the model and guide, the particle plate not counted (1 for a
            :class:`pyro_vae.VAE`; ``inf`` guesses it from a first run, as Pyro's ELBOs do).
        vectorize_particles: accepted for Pyro's signature; the samples are always vectorized.

    Raises:
        ConfigError: a bad argument; at the first call, a global latent site or a score-function guide site
            (:func:`importance_weighted_terms`).
    """

    def __init__(self, num_particles: int = 2, alpha: float = 0.0, estimator: str | Estimator = "pathwise",
                 max_plate_nesting: float = float("inf"), vectorize_particles: bool = True,
                 retain_graph: bool | None = None) -> None:
        num_particles = integer("num_particles", num_particles, 1)
        alpha = number("alpha", alpha, minimum=0.0, strict=False)
        if alpha >= 1.0:
            raise ConfigError(message("alpha", "an order 0 <= alpha < 1 (alpha = 1 is the ELBO)", repr(alpha),
                                      'pass alpha=0 (the IWAE bound), or train the ELBO with elbo="trace"'))
        est = get_estimator(estimator)
        if est.name == "vimco" and num_particles < 2:
            raise ConfigError(message('num_particles with estimator "vimco"', "K >= 2 importance samples (each "
                                      "draw's learning signal leaves it out)", str(num_particles),
                                      "pass num_particles=K with K >= 2"))
        if "iwae" not in est.objectives:
            raise ConfigError(message(
                f'estimator "{est.name}" with the IWAE bound', "an estimator of the IWAE bound: "
                + ", ".join(f'"{e}"' for e in ("pathwise", "dreg")), f'"{est.name}" (for the ELBO only)',
                'pass estimator="dreg" or "pathwise" (or train the ELBO with elbo="trace")'))
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True, retain_graph=retain_graph)
        self.max_plate_nesting = max_plate_nesting + 1  # the particle plate, left of the model's plates
        self.alpha = alpha
        self.estimator = est

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        model_trace, guide_trace, _ = iwae_traces(model, guide, args, kwargs,
                                                  max_plate_nesting=self.max_plate_nesting)
        return model_trace, guide_trace

    def _wrapped(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Callable, Callable]:
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
            if self.num_particles == 1:  # Pyro counts the particle plate only for K > 1
                self.max_plate_nesting += 1
        plate = pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-int(self.max_plate_nesting))
        model, guide = plate(model), plate(guide)
        if self.estimator.name != "pathwise":
            model = EstimatorMessenger(self.estimator, "model")(model)
            guide = EstimatorMessenger(self.estimator, "guide")(guide)
        return model, guide

    def loss_and_surrogate(self, model: Callable, guide: Callable, *args: Any,
                           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, surrogate_loss)`` as tensors: the detached negative bound of the batch and the negative
        surrogate whose gradient is the estimator (equal in value), without host synchronization."""
        wrapped_model, wrapped_guide = self._wrapped(model, guide, args, kwargs)
        dreg = self.estimator.path_derivative and torch.is_grad_enabled()
        model_trace, guide_trace, stopped = iwae_traces(wrapped_model, wrapped_guide, args, kwargs,
                                                        detached_model=dreg, max_plate_nesting=self.max_plate_nesting)
        bound, surrogate = importance_weighted_terms(model_trace, guide_trace, -int(self.max_plate_nesting),
                                                     self.alpha, stopped, self.estimator.name == "vimco")
        return -bound, -surrogate

    @torch.no_grad()
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative bound of the batch (nats, scaled to ``num_data``), one estimate from ``K`` samples."""
        loss = self.loss_and_surrogate(model, guide, *args, **kwargs)[0]
        return float(warn_if_nan(loss, "loss"))

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The negative surrogate: the loss in value, the estimator's gradient."""
        return self.loss_and_surrogate(model, guide, *args, **kwargs)[1]

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss (as :meth:`loss`), after backpropagating the surrogate into the parameters' ``.grad``."""
        loss, surrogate = self.loss_and_surrogate(model, guide, *args, **kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return float(warn_if_nan(loss, "loss"))
