"""Per-site gradient estimators inside Pyro's ELBOs: control variates, leave-one-out, measure-valued, and the
estimators for discrete sites (enumeration, ARM, DisARM, MuProp, NVIL, REBAR, RELAX, Gumbel-Rao).

An estimator whose ``site_gradient`` is set (see :data:`pyro_vae.infer.estimators.ESTIMATORS`) wraps each latent
guide site in :class:`~pyro_vae.infer.estimators.SiteGradient`: the draw is detached and Pyro adds no gradient
term for the guide's parameters there. This module adds the estimator's own term to the surrogate ELBO, a
sum over those sites of ``G . theta`` with ``G`` the detached one-draw gradient estimate of the expected cost
with respect to the site distribution's parameters ``theta``:

==============================  ==================================================  ===========================
``estimator``                   ``G``                                               evaluations of the model
==============================  ==================================================  ===========================
score-function-mean-baseline    ``(f(z) - mean_m f(z'_m)) d log q(z)``              ``1 + M`` (any family)
score-function-optimal-cv       ``(f(z) - c) s(z)``, ``c`` per parameter            ``1 + M`` (Normal)
score-function-delta-cv         ``(f - f~)(z) s(z) + grad E f~``                    ``2 + 2 D`` (Normal)
rloo                            ``(f(z_k) - mean_{j != k} f(z_j)) d log q(z_k)``     ``1`` per particle (any)
measure-valued                  coupled weak derivative                             ``1 + 4 D`` (Normal)
enumerate                       ``sum_c f(c) d q(c)``, every configuration ``c``     ``1 + V^D`` (Bernoulli/categorical)
arm                             ``(f(b~) - f(b)) (u - 1/2)``, antithetic pair        ``2`` (Bernoulli)
disarm                          ``1/2 (f(b~) - f(b)) 1[b != b~] (-1)^b s(|phi|)``    ``2`` (Bernoulli)
muprop                          Taylor control variate at ``mu = sigma(phi)``       ``3`` passes (Bernoulli)
nvil                            ``(f(b) - B(x) - c) / max(1, sqrt v) d log q(b)``    ``1`` (any)
==============================  ==================================================  ===========================

(:mod:`pyro_vae.infer.control_variates` and :mod:`pyro_vae.infer.measure_valued` hold the mathematics of the
continuous ones, :mod:`pyro_vae.infer.discrete` that of the discrete ones; ``M`` is the estimator's
``cv_samples``, ``D`` the number of event coordinates of the site, ``V`` the number of values of one coordinate
(2 for a Bernoulli); the delta method's ``2 + 2 D`` counts forward and backward passes.) Each kind is one
:class:`SiteGradientRule` of :data:`SITE_GRADIENTS`: its term, computed from a
:class:`~pyro_vae.infer.site_context.SiteContext`, its evaluations, the particles it needs and the learned
module it trains (MuProp's and NVIL's, REBAR's and RELAX's), which the ELBO holds in ``extra_modules()``.

The cost ``f`` of a value of the site is the ELBO's own: the model is replayed with that value (every other
latent at its drawn value), and ``log p(x, z) - log q(z)`` is summed to the site's plates as in
``Trace_ELBO``'s ``log_r`` (the scaled and masked log-densities). Under ``TraceMeanField_ELBO`` the latent sites
with a registered KL are left out of the cost, and their KL is the closed form: the estimator is then applied
to the rest (the likelihood term) only. The model's other parameters (the decoder's) get their gradient as in
Pyro, by differentiating ``log p`` at the drawn value.

Assumptions, as in a VAE: the other guide sites do not depend on this site's value (a mean-field guide), and
each plate entry's cost depends only on its own value (the entries are perturbed together). The first is checked:
a term that evaluates the cost at values of the site other than its draw (every rule but ``rloo`` and ``nvil``,
whose cost is the draw's own, the full ``log_r`` of ``Trace_ELBO``) would hold a later guide site at a draw that
was made given the site's own draw, which is not the ELBO's cost of the other value; under Pyro's validation such
a guide (a later site's distribution computed from the site's value) is refused, :func:`check_fixed_sites`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import MultiFrameTensor, get_plate_stacks
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.control_variates import (
    delta_method,
    leave_one_out_baseline,
    mean_baseline,
    normal_scores,
    optimal_coefficients,
)
from pyro_vae.infer.discrete import (
    MuPropParameters,
    NVILBaseline,
    arm_term,
    disarm_term,
    enumerate_term,
    muprop_term,
    nvil_term,
)
from pyro_vae.infer.estimators import (
    LATENT_INPUTS,
    Estimator,
    EstimatorTrace_ELBO,
    EstimatorTraceMeanField_ELBO,
    SiteGradient,
    unwrap_independent,
)
from pyro_vae.infer.gumbel_rao import gumbel_rao_evaluations, gumbel_rao_term
from pyro_vae.infer.measure_valued import measure_valued_normal
from pyro_vae.infer.rebar import REBAR_EVALUATIONS, rebar_control, rebar_term, relax_control
from pyro_vae.infer.site_context import PARTICLE_PLATE_NAME, SiteContext
from pyro_vae.pyro_internals import particle_loss, particle_traces

__all__ = ["SITE_GRADIENTS", "SiteGradientRule", "site_gradient_rule", "one_evaluation", "PARTICLE_PLATE_NAME",
           "analytic_kl_sites", "site_cost", "unchecked", "site_surrogate", "check_fixed_sites", "evaluations",
           "SiteGradientTrace_ELBO",
           "SiteGradientTraceMeanField_ELBO"]



def evaluations(est: Estimator, event_size: int, values: int = 2) -> int:
    """Model evaluations per estimate (one particle) of ``est`` on a site of ``event_size`` coordinates, each
    taking ``values`` values (2 for a Bernoulli site; the classes ``K`` of a categorical site, whose coordinates
    are its categorical variables), counting the draw's own; for the delta method, forward and backward passes.
    ``"enumerate"``: ``1 + values ** event_size``."""
    return site_gradient_rule(est).evaluations(est, event_size, values)


def analytic_kl_sites(model_trace: Trace, guide_trace: Trace) -> set[str]:
    """The latent sites whose KL ``TraceMeanField_ELBO`` takes in closed form (a ``kl_divergence`` of the guide's
    and the model's distributions is registered)."""
    out = set()
    site: Any
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name not in guide_trace.nodes:
            continue
        try:
            guide_site: Any = guide_trace.nodes[name]
            kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            continue
        out.add(name)
    return out


def unchecked(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """A Bernoulli distribution (under ``Independent`` wrappers, inside a
    :class:`~pyro_vae.infer.estimators.SiteGradient` or not) rebuilt without support checks, so that its
    log-density, linear in the value, can be read at a probability; other families as they are."""
    if isinstance(fn, SiteGradient):
        fn = fn.base
    family, dims = unwrap_independent(fn)
    if not isinstance(family, torch.distributions.Bernoulli):
        return fn
    out: torch.distributions.Distribution = dist.Bernoulli(logits=family.logits, validate_args=False)
    for d in reversed(dims):
        out = dist.Independent(out, d, validate_args=False)
    return out


def site_cost(model: Callable, args: tuple, kwargs: dict, guide_trace: Trace, site: str,
              analytic: set[str] = frozenset(),  # type: ignore[assignment]
              validate: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``cost(value) -> (*batch_shape)``: the ELBO's cost of each plate entry of guide site ``site`` at
    ``value`` (the site's value shape), ``log p(x, z) - log q(z)`` summed to the site's plates with every other
    latent at its value in ``guide_trace``; the sites in ``analytic`` (closed-form KL) are left out. ``model``
    is replayed once per call, with ``args`` and ``kwargs``. Differentiable in ``value`` (and in the
    parameters; detach what you keep). ``validate=False``: no support checks (the model replayed under
    ``pyro.validation_enabled(False)``, a Bernoulli guide read through :func:`unchecked`), for values outside the
    support such as a Bernoulli's probabilities."""
    g: Any = guide_trace.nodes[site]
    guide_fn = g["fn"] if validate else unchecked(g["fn"])
    batch_shape = g["value"].shape[: g["value"].dim() - g["fn"].event_dim]
    others = MultiFrameTensor()
    for name, node in guide_trace.nodes.items():
        if node["type"] == "sample" and not node["is_observed"] and name != site and name not in analytic:
            others.add((node["cond_indep_stack"], -node["log_prob"].detach()))

    def cost(value: torch.Tensor) -> torch.Tensor:
        replay = Trace()
        for name, node in guide_trace.nodes.items():
            if node["type"] == "sample" and not node["is_observed"]:
                replay.add_node(name, type="sample", is_observed=False, infer=node["infer"],
                                value=value if name == site else node["value"])
        checks = contextlib.nullcontext() if validate else pyro.validation_enabled(False)
        with checks:
            model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=replay)).get_trace(
                *args, **kwargs))
            model_trace.compute_log_prob()
        stacks = get_plate_stacks(model_trace)
        total = MultiFrameTensor(*others.items())
        for name, node in model_trace.nodes.items():
            if node["type"] == "sample" and not (name in analytic and not node["is_observed"]):
                total.add((stacks[name], node["log_prob"]))
        if site not in analytic:
            total.add((g["cond_indep_stack"], -scale_and_mask(guide_fn.log_prob(value), g["scale"], g["mask"])))
        out = total.sum_to(g["cond_indep_stack"])
        if not torch.is_tensor(out):
            return torch.zeros(batch_shape, dtype=value.dtype, device=value.device)
        return out.expand(batch_shape)

    return cost


def _normal(ctx: SiteContext) -> torch.distributions.Normal:
    base = ctx.family
    if not isinstance(base, torch.distributions.Normal):
        raise ctx.refuse("a Normal guide distribution (to_event allowed)",
                         'use "score-function-mean-baseline" or "rloo", which apply to any family')
    return base


def _score_term(ctx: SiteContext, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``((f - b) log q(value)).sum()``: the score-function term with baseline ``b`` (both detached)."""
    return ((f - b) * ctx.base.log_prob(ctx.value)).sum()


def _mean_baseline_term(ctx: SiteContext) -> torch.Tensor:
    base = ctx.base
    b = mean_baseline(ctx.detached_cost, lambda: base.sample(), ctx.est.cv_samples)
    return _score_term(ctx, ctx.detached_cost(ctx.value), b)


def _rloo_term(ctx: SiteContext) -> torch.Tensor:
    f = ctx.detached_cost(ctx.value)
    return _score_term(ctx, f, leave_one_out_baseline(f, ctx.particle_dim()))


def _normal_term(ctx: SiteContext) -> torch.Tensor:
    normal = _normal(ctx)
    value, event_dim, kind = ctx.value, ctx.event_dim, ctx.est.site_gradient
    loc, scale = normal.loc, normal.scale
    if kind == "optimal-cv":
        f = ctx.detached_cost(value).reshape(value.shape[: value.dim() - event_dim] + (1,) * event_dim)
        c_loc, c_scale = optimal_coefficients(ctx.detached_cost, loc.detach(), scale.detach(), value.shape,
                                              event_dim, ctx.est.cv_samples)
        s_loc, s_scale = normal_scores(value, loc.detach(), scale.detach())
        g_loc, g_scale = (f - c_loc) * s_loc, (f - c_scale) * s_scale
    elif kind == "delta-cv":
        g_loc, g_scale = delta_method(ctx.cost, value, loc, scale, event_dim)
    else:
        with torch.no_grad():
            g_loc, g_scale = measure_valued_normal(ctx.cost, value, loc, scale, event_dim)
    return (g_loc.detach() * loc).sum() + (g_scale.detach() * scale).sum()


def one_evaluation(est: Estimator, event_size: int, values: int = 2) -> int:
    """One model evaluation per estimate, the draw's own (the default of :attr:`SiteGradientRule.evaluations`)."""
    return 1


@dataclass(frozen=True)
class SiteGradientRule:
    """How one kind of per-site estimator (``Estimator.site_gradient``) computes its term.

    Attributes:
        term: ``term(ctx) -> scalar tensor``, the term added to the surrogate ELBO for one site
            (:class:`~pyro_vae.infer.site_context.SiteContext`); its gradient with respect to the guide's
            parameters at the site is the estimate (its value carries no meaning), its gradient with respect to
            the estimator's learned module (if any) trains that module (the ELBO is maximized).
        evaluations: ``evaluations(est, event_size, values) -> int``, model evaluations per estimate (one particle),
            counting the draw's own.
        module: builds the estimator's learned module from the shape of one data point (``None``: nothing
            learned); the ELBO holds it in ``extra_modules()``, so fit optimizes and checkpoints it.
        min_particles: the vectorized particles ``K`` an estimate needs.
        particles_reason: why it needs them (for the error message).
    (Whether a rule needs the other latents held at their draws is the estimator's
    :attr:`~pyro_vae.infer.estimators.Estimator.fixed_sites`.)
    """

    term: Callable[[SiteContext], torch.Tensor]
    evaluations: Callable[[Estimator, int, int], int] = one_evaluation
    module: Callable[[Sequence[int]], nn.Module] | None = None
    min_particles: int = 1
    particles_reason: str = ""


#: The per-site estimators, keyed by ``Estimator.site_gradient``: one :class:`SiteGradientRule` each.
SITE_GRADIENTS: dict[str, SiteGradientRule] = {
    "mean-baseline": SiteGradientRule(_mean_baseline_term, lambda est, d, v: 1 + est.cv_samples),
    "optimal-cv": SiteGradientRule(_normal_term, lambda est, d, v: 1 + est.cv_samples),
    "delta-cv": SiteGradientRule(_normal_term, lambda est, d, v: 2 + 2 * d),
    "rloo": SiteGradientRule(_rloo_term, min_particles=2,
                             particles_reason="K >= 2 draws (each is baselined by the mean of the others)"),
    "measure-valued": SiteGradientRule(_normal_term, lambda est, d, v: 1 + 4 * d),
    "rebar": SiteGradientRule(rebar_term, lambda est, d, v: REBAR_EVALUATIONS, module=rebar_control),
    "relax": SiteGradientRule(rebar_term, lambda est, d, v: REBAR_EVALUATIONS, module=relax_control),
    "gumbel-rao": SiteGradientRule(gumbel_rao_term, gumbel_rao_evaluations),
    "enumerate": SiteGradientRule(enumerate_term, lambda est, d, v: 1 + v ** d),
    "arm": SiteGradientRule(arm_term, lambda est, d, v: 2),
    "disarm": SiteGradientRule(disarm_term, lambda est, d, v: 2),
    "muprop": SiteGradientRule(muprop_term, lambda est, d, v: 3, module=MuPropParameters),
    "nvil": SiteGradientRule(nvil_term, module=NVILBaseline),
}


def site_gradient_rule(est: Estimator) -> SiteGradientRule:
    """The :class:`SiteGradientRule` of ``est`` (:class:`ConfigError` when ``est.site_gradient`` has none)."""
    if est.site_gradient not in SITE_GRADIENTS:
        raise ConfigError(message(f'estimator "{est.name}"', "a site_gradient of " + ", ".join(SITE_GRADIENTS),
                                  repr(est.site_gradient), "register its SiteGradientRule in SITE_GRADIENTS"))
    return SITE_GRADIENTS[est.site_gradient]


def check_fixed_sites(est: Estimator, guide_trace: Trace) -> None:
    """Refuse a guide on which the per-site estimator ``est`` is biased: one whose rule has
    :attr:`~pyro_vae.infer.estimators.Estimator.fixed_sites` and a latent site wrapped in
    :class:`~pyro_vae.infer.estimators.SiteGradient` from whose value a later guide site's distribution is
    computed. The dependencies are those :class:`~pyro_vae.infer.estimators.EstimatorMessenger` recorded in the
    later sites' ``infer[LATENT_INPUTS]`` (under Pyro's validation, with gradients enabled; a trace without
    them passes). Reads the trace only: no model or guide evaluation.

    Raises:
        ConfigError: naming the estimator, the site, the later site that depends on it, and the fixes.
    """
    if est.site_gradient is None or not est.fixed_sites:
        return
    nodes: Any = guide_trace.nodes
    for later, node in nodes.items():
        if node["type"] != "sample":
            continue
        for name in node["infer"].get(LATENT_INPUTS, ()):
            if name in nodes and isinstance(nodes[name]["fn"], SiteGradient):
                raise ConfigError(message(
                    f'estimator "{est.name}" at site "{name}"',
                    "a guide whose later latent sites' distributions are not computed from this site's value (the "
                    "estimator evaluates the ELBO's cost at other values of the site with the other latents held "
                    "at their draws, which is biased when a later draw was made given this one)",
                    f'guide site "{later}", whose distribution is computed from the value of "{name}"',
                    'use "rloo" or "score-function" (unbiased for any guide), or "pathwise" for a '
                    "reparameterized site; or make the guide mean-field"))


def site_surrogate(est: Estimator, model: Callable, args: tuple, kwargs: dict, model_trace: Trace,
                   guide_trace: Trace, meanfield: bool = False, module: nn.Module | None = None,
                   training: bool = True) -> torch.Tensor | float:
    """The term ``est`` adds to the surrogate ELBO of one particle (or one vectorized pair of traces), summed
    over the guide sites wrapped in :class:`~pyro_vae.infer.estimators.SiteGradient`; its gradient with respect to
    the guide's parameters is the estimator's (its value carries no meaning). Each site's term comes from the
    :class:`SiteGradientRule` of ``est.site_gradient`` in :data:`SITE_GRADIENTS`.

    Args:
        est: an estimator with ``site_gradient`` set.
        model: the model as the ELBO traced it (its estimator handler and particle plate included).
        args, kwargs: the model's arguments.
        model_trace, guide_trace: the particle's traces, log-densities computed.
        meanfield: ``TraceMeanField_ELBO`` (closed-form KL sites left out of the cost).
        module: the estimator's learned module (:attr:`SiteGradientRule.module`), if it has one.
        training: whether that module may update its running statistics.

    Raises:
        ConfigError: an estimator at a site of a family it does not apply to; too few vectorized particles; a
            guide on which it is biased (:func:`check_fixed_sites`).
    """
    rule = site_gradient_rule(est)
    check_fixed_sites(est, guide_trace)
    analytic = analytic_kl_sites(model_trace, guide_trace) if meanfield else set()
    total: torch.Tensor | float = 0.0
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or not isinstance(site["fn"], SiteGradient):
            continue
        ctx = SiteContext(est, name, site, site_cost(model, args, kwargs, guide_trace, name, analytic), args, kwargs,
                          module, training, site_cost(model, args, kwargs, guide_trace, name, analytic, False))
        total = total + rule.term(ctx)
    return total


class _SiteGradientMixin:
    """Pyro's particle loss plus :func:`site_surrogate`; the model of each particle is kept from
    ``handle_particle`` to replay it; ``site_module`` is the estimator's learned module (an extra module)."""

    estimator: Estimator
    num_particles: int
    retain_graph: Any
    _pyro_elbo: type[Trace_ELBO] = Trace_ELBO

    def __init__(self, *args: Any, site_module: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.site_module = site_module

    def extra_modules(self) -> list[nn.Module]:
        """Modules the estimator trains besides the VAE (e.g. NVIL's baseline); an optimizer must hold them."""
        own = super().extra_modules()  # type: ignore[misc]
        return [*own, self.site_module] if self.site_module is not None else own

    def handle_particle(self, model: Callable, guide: Callable, args: tuple,
                        kwargs: dict) -> tuple[Callable, Callable]:
        model, guide = super().handle_particle(model, guide, args, kwargs)  # type: ignore[misc]
        self._replay = (model, args, kwargs)
        return model, guide

    def _particles(self, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> Iterator[tuple[Any, torch.Tensor]]:
        pyro_loss = particle_loss(self._pyro_elbo)
        meanfield = issubclass(self._pyro_elbo, TraceMeanField_ELBO)
        module = self.site_module
        training = module is None or module.training
        for model_trace, guide_trace in particle_traces(self, model, guide, args, kwargs):  # type: ignore[arg-type]
            loss, surrogate = pyro_loss(self, model_trace, guide_trace)
            replay_model, a, k = self._replay
            extra = site_surrogate(self.estimator, replay_model, a, k, model_trace, guide_trace, meanfield, module,
                                   training)
            yield loss, surrogate - extra

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """As Pyro's: the loss's value, the estimator's gradient."""
        loss: Any = 0.0
        surrogate: Any = 0.0
        for loss_p, surrogate_p in self._particles(model, guide, args, kwargs):
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """As Pyro's: backpropagates the estimator's surrogate, returns the loss (a float)."""
        loss = 0.0
        for loss_p, surrogate_p in self._particles(model, guide, args, kwargs):
            loss += float(loss_p) / self.num_particles
            if getattr(surrogate_p, "requires_grad", False):
                (surrogate_p / self.num_particles).backward(retain_graph=self.retain_graph)
        return loss


class SiteGradientTrace_ELBO(_SiteGradientMixin, EstimatorTrace_ELBO):
    """``Trace_ELBO`` (Monte Carlo KL) with a per-site estimator (:func:`site_surrogate`) on the guide's sites."""

    _pyro_elbo = Trace_ELBO


class SiteGradientTraceMeanField_ELBO(_SiteGradientMixin, EstimatorTraceMeanField_ELBO):
    """``TraceMeanField_ELBO``: the closed-form KL where one is registered, and a per-site estimator
    (:func:`site_surrogate`) on the rest of the ELBO (the likelihood term)."""

    _pyro_elbo = TraceMeanField_ELBO
