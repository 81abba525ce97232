"""Many independent one-sample gradient estimates at fixed parameters, and their statistics.

:func:`gradient_samples` draws ``num_samples`` independent estimates of the gradient of the loss
(the negative ELBO of the batch ``x``, as Pyro's ``loss_and_grads`` leaves it in ``.grad``) under one
estimator of :mod:`pyro_vae.infer.estimators`. Two implementations compute the same estimator:

- ``method="loop"``, the reference: Pyro's own ``loss_and_grads`` called ``num_samples`` times;
- ``method="vectorized"``: ``torch.func.vmap`` of ``torch.func.grad`` of a ``functional_call`` of the
  model/guide pair, with the guide's noise passed in as the vmapped input (random draws cannot happen
  inside ``vmap`` over a Pyro trace). The per-sample surrogate loss is the one of the Pyro ELBO the loop
  calls: ``Trace_ELBO`` (``score_parts`` of every site, ``log_r`` summed to each site's plates),
  ``TraceMeanField_ELBO`` (the registered KL where there is one, Monte Carlo elsewhere), for the
  baseline estimators ``TraceGraph_ELBO`` (each score-function site weighted by the cost terms that
  depend on it, minus the baseline) or, with ``elbo="iwae"``, the importance-weighted bound's
  (:func:`pyro_vae.infer.iwae.importance_weighted_terms`: ``num_particles`` importance samples, the bound's own
  gradient or the doubly reparameterized one of ``"dreg"``). ``"stl"`` changes the guide's distribution
  (:class:`~pyro_vae.infer.path_gradient.PathGradient`), which both paths read from ``score_parts``.

The gradient covers every parameter the model and guide traces touch, as ``SVI`` optimizes them: the
trainable parameters of the VAE's modules (encoder, decoder, prior, likelihood) and every ``pyro.param``
a part declares outside them (group ``"pyro.param"``, under its param-store name, at its current value in
the param store; a constrained param is differentiated with respect to its unconstrained value, the
tensor Pyro's optimizers update). :func:`parameter_groups` lists them in the order of the columns.

The vectorized path assumes that the traces have the same structure at every draw (the same latent sites
with the same shapes, the same ``pyro.param`` statements, the same dependencies between sites): it reads
that structure from one plain run of the guide and the model.

Baselines are held fixed while sampling: the decaying average is warmed up with Pyro's ``TraceGraph_ELBO``
and then frozen, the neural baseline is evaluated at its current parameters.

:func:`gradient_statistics` summarizes samples per parameter group (encoder, decoder, prior, likelihood,
pyro.param): the mean per-coordinate variance ``(1/D) tr Cov``, the total variance ``tr Cov``, the
signal-to-noise ratio ``|mean| / std`` averaged over coordinates (Rainforth et al. 2018), and the bias
against an exact gradient when one is known (the linear-Gaussian VAE: :func:`exact_gradient`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import MultiFrameTensor, is_identically_zero
from pyro.ops.provenance import get_provenance
from pyro.params.param_store import user_param_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import constraints, transform_to

from pyro_vae.errors import ConfigError, NonFiniteLossError, message
from pyro_vae.infer.elbo import check_elbo, make_elbo
from pyro_vae.infer.estimators import (
    BASELINE_PARAM,
    Estimator,
    EstimatorMessenger,
    NeuralBaseline,
    ScoreFunction,
    get_estimator,
    unwrap_independent,
)
from pyro_vae.infer.iwae import importance_weighted_terms, iwae_traces
from pyro_vae.infer.kl import kl_report
from pyro_vae.infer.pair import as_pair
from pyro_vae.infer.path_gradient import PathGradient
from pyro_vae.infer.site_gradients import check_fixed_sites, site_gradient_rule, site_surrogate
from pyro_vae.models.context import check_context, declared_shapes
from pyro_vae.models.linear_gaussian import exact_elbo
from pyro_vae.models.vae import VAE
from pyro_vae.pyro_internals import param_constraints, trace_log_r, unconstrained_params
from pyro_vae.validation import integer

__all__ = ["gradient_samples", "gradient_statistics", "parameter_groups", "exact_gradient", "flat_gradient",
           "summarize", "METHODS", "PARAM_GROUP"]

METHODS = ("vectorized", "loop")
GROUPS = ("encoder", "decoder", "prior", "likelihood")
#: Group of the ``pyro.param`` statements outside the VAE's modules (named by their param-store names).
PARAM_GROUP = "pyro.param"


def _module_groups(vae: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in vae.named_parameters():
        if not p.requires_grad:
            continue
        head = name.split(".", 1)[0]
        groups.setdefault(head if head in GROUPS else "other", []).append((name, p))
    order = [g for g in (*GROUPS, "other") if g in groups]
    return {g: groups[g] for g in order}


def parameter_groups(vae: nn.Module, x: torch.Tensor | None = None,
                     **model_kwargs: Any) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The parameters a gradient sample covers, in the order of its columns, per group.

    ``{"encoder": [(name, param), ...], "decoder": ..., "prior": ..., "likelihood": ..., "other": ...}``
    holds the trainable parameters of the VAE's modules (empty groups left out). With a batch ``x`` the
    guide and the model are run once on it (``model_kwargs`` passed on), and every ``pyro.param`` they
    declare outside the VAE's modules follows under ``"pyro.param"`` as ``(param-store name, unconstrained
    tensor)``; without ``x`` those are not known and left out. A ``pyro.param`` not yet in the param store is
    created by that run, as a first ``SVI`` step would create it.
    """
    if x is None:
        return _module_groups(vae)
    return _plan(vae, x, _AS_SAMPLED, 1, "trace", model_kwargs).groups


#: No estimator: the sites as the model and guide sample them (only their parameters are read).
_AS_SAMPLED = Estimator("as-sampled", description="the sites as the model and guide sample them")


def _split(flat: torch.Tensor, groups: dict[str, list[tuple[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for g, items in groups.items():
        n = sum(p.numel() for _, p in items)
        out[g] = flat[..., i: i + n]
        i += n
    return out


def flat_gradient(vae: nn.Module, loss: torch.Tensor, x: torch.Tensor | None = None,
                  **model_kwargs: Any) -> torch.Tensor:
    """Gradient of a scalar ``loss`` with respect to the parameters of :func:`parameter_groups` (``x`` and
    ``model_kwargs`` as there), flattened in that order, ``(num_params,)``."""
    params = [p for items in parameter_groups(vae, x, **model_kwargs).values() for _, p in items]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def exact_gradient(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Exact gradient of the loss ``-sum(ELBO(x))`` of a linear-Gaussian VAE (see
    :mod:`pyro_vae.models.linear_gaussian`), by autograd of the closed form; ``(num_params,)`` over the VAE's
    module parameters (the model has no ``pyro.param``)."""
    return flat_gradient(vae, -exact_elbo(vae, x).sum())


def _model_and_guide(vae: nn.Module) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``vae.model`` and ``vae.guide``, the methods of the pair (nn.Module's ``__getattr__`` would type them as
    ``Tensor | Module``)."""
    return cast(Callable[..., Any], vae.model), cast(Callable[..., Any], vae.guide)


# --------------------------------------------------------------------------------- noise-driven guide
class _NoiseMessenger(Messenger):
    """Sets each latent guide site's value from given noise instead of drawing it: ``loc + scale * eps``
    for Normal, ``1[u < p]`` for Bernoulli, Gumbel-softmax / Gumbel-max for (relaxed) one-hot categoricals; detached
    when the site uses the score function."""

    def __init__(self, noise: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.noise = noise

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] in self.noise and not msg["is_observed"]:
            msg["value"] = _draw(msg["fn"], self.noise[msg["name"]], msg["name"])


def _categorical_kind(base: Any) -> bool:
    return hasattr(base, "from_gumbel") or isinstance(base, (
        torch.distributions.OneHotCategorical, torch.distributions.RelaxedOneHotCategorical,
        torch.distributions.relaxed_categorical.ExpRelaxedCategorical))


def _noise_kind(fn: torch.distributions.Distribution, site: str) -> str:
    base = fn.base if isinstance(fn, (ScoreFunction, PathGradient)) else fn
    base, _ = unwrap_independent(base)
    if isinstance(base, (torch.distributions.Normal,)):
        return "normal"
    if _categorical_kind(base):
        return "gumbel"
    if isinstance(base, torch.distributions.Bernoulli) or hasattr(base, "from_uniform"):
        return "uniform"
    raise ConfigError(message(
        f'guide site "{site}"', "a Normal, Bernoulli or (relaxed) one-hot categorical guide for vectorized sampling",
        type(base).__name__, 'use method="loop"'))


def _one_hot_argmax(t: torch.Tensor) -> torch.Tensor:
    # F.one_hot checks its input's range with .item(), which vmap refuses
    return torch.zeros_like(t).scatter(-1, t.argmax(-1, keepdim=True), 1.0)


def _draw(fn: torch.distributions.Distribution, eps: torch.Tensor, site: str) -> torch.Tensor:
    """The value ``fn`` draws from standard noise ``eps`` (Normal: ``eps``; Bernoulli: uniform ``eps``, the value
    ``1[eps < p]``; categoricals: Gumbel noise), in
    the distribution's own representation (a distribution with ``from_gumbel`` says itself what a Gumbel
    draw gives)."""
    detach = isinstance(fn, ScoreFunction) or not fn.has_rsample
    base = fn.base if isinstance(fn, (ScoreFunction, PathGradient)) else fn
    base, _ = unwrap_independent(base)
    if hasattr(base, "from_gumbel"):
        value = base.from_gumbel(eps)
    elif hasattr(base, "from_uniform"):  # the Bernoulli latent in logit space, relaxed or exact
        value = base.from_uniform(eps)
    elif isinstance(base, torch.distributions.Normal):
        value = base.loc + base.scale * eps
    elif isinstance(base, torch.distributions.Bernoulli):
        value = (eps < base.probs).to(eps.dtype)
    elif isinstance(base, torch.distributions.OneHotCategorical):
        value = _one_hot_argmax(base.logits + eps)
    elif isinstance(base, torch.distributions.relaxed_categorical.ExpRelaxedCategorical):
        value = torch.log_softmax((base.logits + eps) / base.temperature, dim=-1)
    elif isinstance(base, torch.distributions.RelaxedOneHotCategorical):
        logx = torch.log_softmax((base.logits + eps) / base.temperature, dim=-1)
        value = logx.exp()
        if getattr(base, "straight_through", False):
            value = _one_hot_argmax(logx) + (value - value.detach())
    else:  # pragma: no cover - _noise_kind rejects it first
        raise ConfigError(message(f'guide site "{site}"', "a supported distribution", type(base).__name__,
                                  'use method="loop"'))
    return value.detach() if detach else value


def _standard_noise(kind: str, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape, device=device, dtype=dtype)
    if kind == "uniform":
        return torch.rand(shape, device=device, dtype=dtype)
    u = torch.rand(shape, device=device, dtype=dtype).clamp(torch.finfo(dtype).tiny, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(torch.finfo(dtype).tiny))


def _particles(fn: Callable, num_particles: int, always: bool = False) -> Callable:
    """``fn`` in the vectorized particle plate (also for one particle with ``always``: the IWAE bound)."""
    if num_particles == 1 and not always:
        return fn
    return pyro.plate("num_particles_vectorized", num_particles, dim=-2)(fn)


def _guide_for(est: Estimator) -> EstimatorMessenger:
    # baselines are Pyro's business in the loop and subtracted by hand in the surrogate
    return EstimatorMessenger(dataclasses.replace(est, baseline=None), "guide")


# ------------------------------------------------------------------------------------ the traces' plan
@dataclasses.dataclass
class _Plan:
    """What one run of the guide and the model shows: the parameters (in column order), the latent
    sites, the cost terms of each score-function site (``TraceGraph_ELBO``) and the KL method per site."""

    groups: dict[str, list[tuple[str, torch.Tensor]]]
    vae_names: dict[str, tuple[str, Any]]  # param-store name of a VAE parameter -> (name in the VAE, constraint)
    store: dict[str, Any]  # pyro.param outside the VAE's modules -> its constraint
    external: list[str]  # pyro.module registrations of modules the VAE does not hold
    latent: dict[str, tuple[torch.Tensor, torch.distributions.Distribution]]  # latent site -> (a value, distribution)
    costs: dict[str, tuple[list[str], list[str]]]  # score-function site -> (model sites, guide sites)
    analytic_kl: list[str]
    monte_carlo_kl: list[str]

    @property
    def names(self) -> list[str]:
        return [n for items in self.groups.values() for n, _ in items]

    def tensors(self) -> list[torch.Tensor]:
        """The current leaf tensors, in column order (param-store entries looked up by name)."""
        leaves = unconstrained_params()
        return [leaves[n] if g == PARAM_GROUP else p for g, items in self.groups.items() for n, p in items]


def _plan(vae: nn.Module, x: torch.Tensor, est: Estimator, num_particles: int, elbo: str,
          kwargs: dict) -> _Plan:
    """Run the guide and the model once (the RNG left as it was, no gradients) and read the plan off.

    ``pyro.param`` statements create their params as a first ``SVI`` step would; registrations of the
    VAE's own modules that the run adds to the param store are taken out again. For ``"stl"``/``"dreg"`` and the
    per-site estimators the guide runs with gradients, so that under Pyro's validation the guides they are biased
    on are refused as ``make_elbo``'s ELBO refuses them (the vectorized surrogate runs without validation):
    :func:`~pyro_vae.infer.path_gradient.check_independent_parameters`,
    :func:`~pyro_vae.infer.site_gradients.check_fixed_sites`.

    Raises:
        ConfigError: such a guide (under validation)."""
    groups = _module_groups(vae)
    ids = {id(p): n for items in groups.values() for n, p in items}
    store = pyro.get_param_store()
    before = set(store.keys())
    vae_model, vae_guide = _model_and_guide(vae)
    model = EstimatorMessenger(est, "model")(vae_model)
    guide = _guide_for(est)(vae_guide)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        tracker = TrackNonReparam() if est.baseline is not None else contextlib.nullcontext()
        checked = est.path_derivative or est.site_gradient is not None
        with poutine.trace(param_only=True) as params, tracker:
            iw = elbo == "iwae"
            with torch.enable_grad() if checked else contextlib.nullcontext():
                guide_tr = poutine.trace(_particles(guide, num_particles, iw)).get_trace(x, **kwargs)
            if est.site_gradient is not None:
                check_fixed_sites(est, guide_tr)
            model_tr = poutine.trace(poutine.replay(_particles(model, num_particles, iw), trace=guide_tr)).get_trace(
                x, **kwargs)
            model_tr, guide_tr = prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)
            costs: dict[str, tuple[list[str], list[str]]] = {}
            if est.baseline is not None:
                model_tr.compute_log_prob()
                guide_tr.compute_score_parts()
                for role, tr in (("model", model_tr), ("guide", guide_tr)):
                    for name, site in tr.nodes.items():
                        if site["type"] == "sample":
                            for key in get_provenance(site["log_prob_sum"]):
                                costs.setdefault(key, ([], []))[role == "guide"].append(name)
        analytic, monte_carlo = [], []
        latent_sites = [n for n, s in model_tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
        if elbo == "meanfield":
            report = kl_report(model, x, guide=guide, **kwargs)
            analytic, monte_carlo = report.analytic, report.monte_carlo
        else:
            monte_carlo = latent_sites
    vae_names: dict[str, tuple[str, Any]] = {}
    pyro_params: dict[str, Any] = {}
    external: list[str] = []
    leaves, constraint_of = unconstrained_params(store), param_constraints(store)
    for name, site in params.trace.nodes.items():
        if site["type"] != "param" or name.startswith(BASELINE_PARAM) or name not in leaves:
            continue
        tensor = leaves[name]
        if id(tensor) in ids:
            vae_names[name] = (ids[id(tensor)], constraint_of.get(name, constraints.real))
            if name not in before:
                del store[name]
        elif user_param_name(name) != name:  # "module$$$param": a pyro.module registration
            external.append(name)
        else:
            pyro_params[name] = constraint_of.get(name, constraints.real)
    extra = [(n, leaves[n]) for n in [*pyro_params, *external]]
    if extra:
        groups[PARAM_GROUP] = extra
    latent = {n: (cast(torch.Tensor, s["value"]).detach(), cast(torch.distributions.Distribution, s["fn"]))
              for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    return _Plan(groups, vae_names, pyro_params, external, latent, costs, list(analytic), list(monte_carlo))


class _FunctionalParams(Messenger):
    """Inside ``functional_call``: answer each ``pyro.param`` statement with the functional tensors of the
    plan, ``transform_to(constraint)`` of the unconstrained value: for a ``pyro.param`` entry the value
    given by name, for a parameter of the VAE's modules (a ``pyro.module`` registration, a ``PyroModule``
    parameter) the tensor ``functional_call`` has put in the module. Pyro's param store is not read."""

    def __init__(self, vae: nn.Module, plan: _Plan, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.vae, self.plan, self.values = vae, plan, values
        self.answered: set[str] = set()

    def _pyro_param(self, msg: dict) -> None:
        name = msg["name"]
        if name in self.values:
            msg["value"] = transform_to(self.plan.store[name])(self.values[name])
            self.answered.add(name)
        elif name in self.plan.vae_names:
            attr, constraint = self.plan.vae_names[name]
            msg["value"] = transform_to(constraint)(operator.attrgetter(attr)(self.vae))
        else:
            raise ConfigError(message(
                f'Pyro param "{name}"', "the pyro.param statements of the run that collected the parameters",
                "a statement that run did not make (the traces change structure between draws)",
                'use method="loop"'))


class _Surrogate(nn.Module):
    """``forward(noise, x, params)``: the surrogate loss of one estimate (the quantity whose gradient is the
    estimator), averaged over ``num_particles``; ``params`` holds the unconstrained values of the plan's
    ``pyro.param`` entries by name."""

    def __init__(self, vae: nn.Module, est: Estimator, num_particles: int, elbo: str,
                 baseline: dict[str, torch.Tensor] | None, kwargs: dict, plan: _Plan,
                 site_module: nn.Module | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.site_module = site_module  # a per-site estimator's learned module, held fixed
        self.est = dataclasses.replace(est, baseline=None)  # baselines are subtracted in forward
        self.graph = est.baseline is not None  # TraceGraph_ELBO's cost terms
        self.num_particles = num_particles
        self.elbo = elbo
        self.baseline = baseline or {}
        self.kwargs = kwargs
        self.plan = plan
        self.answered: set[str] = set()

    def traces(self, noise: dict[str, torch.Tensor], x: torch.Tensor):
        vae_model, vae_guide = _model_and_guide(self.vae)
        guide = EstimatorMessenger(self.est, "guide")(vae_guide)
        model = EstimatorMessenger(self.est, "model")(vae_model)
        guide = _NoiseMessenger(noise)(_particles(guide, self.num_particles, self.elbo == "iwae"))
        model = _particles(model, self.num_particles, self.elbo == "iwae")
        guide_tr = poutine.trace(guide).get_trace(x, **self.kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, **self.kwargs)
        return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)

    def _iwae_loss(self, noise: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The negative surrogate of the importance-weighted bound (the particle plate left of the data plate)."""
        vae_model, vae_guide = _model_and_guide(self.vae)
        guide = EstimatorMessenger(self.est, "guide")(vae_guide)
        model = EstimatorMessenger(self.est, "model")(vae_model)
        guide = _NoiseMessenger(noise)(_particles(guide, self.num_particles, True))
        model = _particles(model, self.num_particles, True)
        model_tr, guide_tr, stopped = iwae_traces(model, guide, (x,), self.kwargs,
                                                  detached_model=self.est.path_derivative)
        return -importance_weighted_terms(model_tr, guide_tr, -2, 0.0, stopped, self.est.name == "vimco")[1]

    def _cost(self, name: str, model_tr, guide_tr, log_r: MultiFrameTensor | None):
        site = guide_tr.nodes[name]
        if self.graph:  # TraceGraph_ELBO: the terms whose log-density depends on this site
            model_sites, guide_sites = self.plan.costs.get(name, ([], []))
            cost = MultiFrameTensor()
            for m in model_sites:
                cost.add((model_tr.nodes[m]["cond_indep_stack"], model_tr.nodes[m]["log_prob"]))
            for g in guide_sites:
                cost.add((guide_tr.nodes[g]["cond_indep_stack"], -guide_tr.nodes[g]["log_prob"]))
            total = cost.sum_to(site["cond_indep_stack"])
        else:  # Trace_ELBO
            assert log_r is not None  # forward computes it before the first score-function site's cost
            total = log_r.sum_to(site["cond_indep_stack"])
        if name in self.baseline:
            total = total - self.baseline[name]
        return total

    def forward(self, noise: dict[str, torch.Tensor], x: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        answer = _FunctionalParams(self.vae, self.plan, params or {})
        # The param store is set aside while the parts run on functional tensors: the registration checks of
        # pyro.module and PyroModule compare the store's tensors with the module's and would see a mismatch.
        if self.elbo == "iwae":
            with pyro.get_param_store().scope(), answer, pyro.validation_enabled(False):
                loss = self._iwae_loss(noise, x)
            self.answered |= answer.answered
            return loss
        with pyro.get_param_store().scope(), answer, pyro.validation_enabled(False):
            model_tr, guide_tr = self.traces(noise, x)
            model_tr.compute_log_prob()
            guide_tr.compute_score_parts()
            elbo: Any = 0.0
            latent = set()
            if self.elbo == "meanfield":  # TraceMeanField_ELBO: the KL where one is registered
                for name, site in model_tr.nodes.items():
                    if site["type"] != "sample" or site["is_observed"]:
                        continue
                    g = guide_tr.nodes[name]
                    try:
                        kl = kl_divergence(g["fn"], site["fn"])
                    except NotImplementedError:
                        continue  # Monte Carlo, below, as TraceMeanField_ELBO falls back
                    kl = scale_and_mask(kl, scale=g["scale"], mask=g["mask"])
                    kl = kl.sum() if torch.is_tensor(kl) else kl * torch.Size(g["fn"].batch_shape).numel()
                    elbo = elbo - kl
                    latent.add(name)
            for name, site in model_tr.nodes.items():
                if site["type"] == "sample" and name not in latent:
                    elbo = elbo + site["log_prob_sum"]
            log_r = None
            for name, site in guide_tr.nodes.items():
                if site["type"] != "sample" or name in latent:
                    continue
                _, score, entropy = site["score_parts"]
                if not is_identically_zero(entropy):
                    elbo = elbo - entropy.sum()
                if not is_identically_zero(score):
                    if log_r is None and not self.graph:
                        log_r = trace_log_r(model_tr, guide_tr)
                    cost = self._cost(name, model_tr, guide_tr, log_r)
                    elbo = elbo + (cost.detach() * score).sum()
            if self.est.site_gradient is not None:
                vae_model, _ = _model_and_guide(self.vae)
                model = _particles(EstimatorMessenger(self.est, "model")(vae_model), self.num_particles)
                elbo = elbo + site_surrogate(self.est, model, (x,), self.kwargs, model_tr, guide_tr,
                                             self.elbo == "meanfield", self.site_module, training=False)
        self.answered |= answer.answered
        return -elbo / self.num_particles


# ------------------------------------------------------------------------------------------- baselines
def _baselines(vae: nn.Module, x: torch.Tensor, est: Estimator, plan: _Plan, nn_baseline: nn.Module | None,
               warmup: int, kwargs: dict) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
    """Fixed baselines per latent guide site: the warmed-up decaying average or ``nn_baseline(x)``; for a per-site
    estimator with a learned module (:class:`~pyro_vae.infer.site_gradients.SiteGradientRule`), no baselines and
    that module (``nn_baseline`` or a fresh one), which is held fixed while sampling."""
    if est.site_gradient is not None:
        rule = site_gradient_rule(est)
        if rule.module is None:
            return {}, None
        if nn_baseline is None:
            data_shape = cast(tuple[int, ...], vae.data_shape)  # a VAE's attribute (AttributeError without it)
            nn_baseline = rule.module(data_shape).to(x.device)
        return {}, nn_baseline
    if est.baseline is None:
        return {}, None
    sites = list(plan.latent)
    if est.baseline == "neural":
        if nn_baseline is None:
            data_shape = cast(tuple[int, ...], vae.data_shape)  # a VAE's attribute (AttributeError without it)
            nn_baseline = NeuralBaseline(data_shape).to(x.device)
        with torch.no_grad():
            b = nn_baseline(x).detach()
        return {s: b for s in sites}, nn_baseline
    loss_fn = make_elbo("trace", 1, est)
    store = pyro.get_param_store()
    for s in sites:
        if BASELINE_PARAM + s in store:
            del store[BASELINE_PARAM + s]
    model, guide = _model_and_guide(vae)
    for _ in range(max(1, warmup)):
        # every Pyro ELBO defines loss_and_grads; the ELBO base class does not declare it
        loss_fn.loss_and_grads(model, guide, x, **kwargs)  # type: ignore[attr-defined]
    _clear_grads(plan)
    return {s: store[BASELINE_PARAM + s].detach().clone() for s in sites}, None


def _clear_grads(plan: _Plan) -> None:
    for p in plan.tensors():
        p.grad = None


# ---------------------------------------------------------------------------------------- the samplers
def _check(vae: nn.Module, x: torch.Tensor, est: Estimator, num_samples: Any, num_particles: Any, method: str,
           elbo: str) -> tuple[int, int]:
    """``(num_samples, num_particles)`` as ints, once every argument is checked."""
    num_samples = integer("num_samples", num_samples, 1)
    num_particles = integer("num_particles", num_particles, 1)
    if method not in METHODS:
        raise ConfigError(message("method", " or ".join(map(repr, METHODS)), repr(method), 'pass "vectorized"'))
    check_elbo(elbo, est)
    check_data = getattr(vae, "check_data", None)
    if check_data is not None:
        check_data(x)
    return num_samples, num_particles


def _draw_noise(plan: _Plan, n: int) -> dict[str, torch.Tensor]:
    """Standard noise for ``n`` estimates: ``(n, *value shape)`` per latent guide site, in the dtype and on
    the device of the site's values (as the distribution itself would draw it)."""
    return {s: _standard_noise(_noise_kind(fn, s), (n, *v.shape), v.device, v.dtype)
            for s, (v, fn) in plan.latent.items()}


def _iter_loop(vae, x, est, plan, num_samples, num_particles, elbo, baseline, nn_baseline, kwargs, chunk,
               noise: dict[str, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Pyro's ``loss_and_grads``, one estimate per call; with ``noise`` (``(num_samples, ...)`` per latent
    site) the guide's draws are set from it as in the vectorized path."""
    loss_fn = make_elbo(elbo, num_particles, est, nn_baseline=nn_baseline)
    store = pyro.get_param_store()
    known = set(plan.vae_names) | set(plan.store) | set(plan.external)
    rows = []
    for i in range(num_samples):
        for s, b in baseline.items():
            if est.baseline == "decaying":
                shape = (num_particles, *b.shape) if num_particles > 1 else b.shape
                store[BASELINE_PARAM + s] = b.expand(shape).clone()
        params = plan.tensors()
        for p in params:
            p.grad = None
        guide = vae.guide
        if noise is not None:
            guide = _NoiseMessenger({s: e[i] for s, e in noise.items()})(_guide_for(est)(vae.guide))
        with poutine.trace(param_only=True) as seen:
            # every Pyro ELBO defines loss_and_grads; the ELBO base class does not declare it
            loss_fn.loss_and_grads(vae.model, guide, x, **kwargs)  # type: ignore[attr-defined]
        ids = {id(p) for p in params}
        leaves = unconstrained_params(store)
        new = [n for n in seen.trace.nodes if n not in known and not n.startswith(BASELINE_PARAM)
               and id(leaves.get(n)) not in ids]
        if new:
            raise ConfigError(message(
                f'Pyro param "{new[0]}"', "the pyro.param statements of the run that collected the parameters",
                "a statement that run did not make (the traces change structure between draws)",
                "keep the set of pyro.param statements of the model and guide fixed"))
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                               for p in params]))
        if len(rows) == chunk or i == num_samples - 1:
            yield torch.stack(rows)
            rows = []
    _clear_grads(plan)


def _iter_vectorized(vae, x, est, plan, num_samples, num_particles, elbo, baseline, kwargs, chunk,
                     noise: dict[str, torch.Tensor] | None = None,
                     site_module: nn.Module | None = None) -> Iterator[torch.Tensor]:
    """``vmap`` of ``grad`` of the surrogate over noise drawn here (or given, ``(num_samples, ...)``)."""
    from torch.func import functional_call, grad, vmap

    if plan.external:
        raise ConfigError(message(
            f'Pyro param "{plan.external[0]}"',
            "parameters of the VAE's own modules or pyro.param statements for vectorized sampling",
            "a parameter registered with pyro.module from a module the VAE does not hold",
            'use method="loop", or hold that module in a part of the VAE (an nn.Module prior, likelihood, '
            "encoder or decoder)"))
    surrogate = _Surrogate(vae, est, num_particles, elbo, baseline, kwargs, plan, site_module)
    leaves = unconstrained_params()
    module_params = {f"vae.{n}": p.detach() for g, items in plan.groups.items() if g != PARAM_GROUP
                     for n, p in items}
    store_params = {n: leaves[n].detach() for n in plan.store}
    frozen = {n: t.detach() for n, t in surrogate.named_parameters() if n not in module_params}
    frozen.update({n: b for n, b in surrogate.named_buffers()})
    columns = [(g == PARAM_GROUP, n if g == PARAM_GROUP else f"vae.{n}") for g, items in plan.groups.items()
               for n, _ in items]

    def loss(p: dict, s: dict, eps: dict) -> torch.Tensor:
        return functional_call(surrogate, {**p, **frozen}, (eps, x, s))

    # randomness="different": the per-site estimators draw their own noise inside each estimate
    per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0), randomness="different")
    done = 0
    while done < num_samples:
        n = min(chunk, num_samples - done)
        eps = _draw_noise(plan, n) if noise is None else {s: e[done: done + n] for s, e in noise.items()}
        gm, gs = per_sample(module_params, store_params, eps)
        if done == 0:
            missing = [name for name in plan.store if name not in surrogate.answered]
            if missing:
                raise ConfigError(message(
                    f'Pyro param "{missing[0]}"', "a pyro.param statement whose value the part uses",
                    "a parameter the functional run of the traces did not ask for (e.g. a PyroModule "
                    "parameter outside the VAE)", 'use method="loop"'))
        yield torch.cat([(gs[k] if is_param else gm[k]).reshape(n, -1) for is_param, k in columns], dim=1)
        done += n


def _default_chunk(x: torch.Tensor, num_particles: int, method: str) -> int:
    if method == "loop":
        return 256
    budget = 2**25 if x.device.type == "cuda" else 2**21
    return max(1, budget // max(1, num_particles * x.numel()))


def _iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo, nn_baseline, warmup,
                    chunk_size, kwargs, noise=None) -> tuple[_Plan, Iterator[torch.Tensor]]:
    if not isinstance(vae, nn.Module):  # an object with model and guide methods: a model/guide pair
        vae = as_pair(vae)
    est = get_estimator(estimator)
    num_samples, num_particles = _check(vae, x, est, num_samples, num_particles, method, elbo)
    plan = _plan(vae, x, est, num_particles, elbo, kwargs)
    if elbo == "meanfield" and plan.monte_carlo_kl:
        warnings.warn(
            'elbo="meanfield": no closed-form KL is registered for latent site(s) '
            + ", ".join(f'"{s}"' for s in plan.monte_carlo_kl)
            + "; their KL term is the Monte Carlo estimate log q(z|x) - log p(z), as in TraceMeanField_ELBO"
            + (" (analytic KL at " + ", ".join(f'"{s}"' for s in plan.analytic_kl) + ")" if plan.analytic_kl else ""),
            stacklevel=3)
    baseline, nn_baseline = _baselines(vae, x, est, plan, nn_baseline, warmup, kwargs)
    chunk = chunk_size or _default_chunk(x, num_particles, method)
    if method == "loop":
        it: Iterator[torch.Tensor] = _iter_loop(vae, x, est, plan, num_samples, num_particles, elbo, baseline,
                                                nn_baseline, kwargs, chunk, noise)
    else:
        it = _iter_vectorized(vae, x, est, plan, num_samples, num_particles, elbo, baseline, kwargs, chunk, noise,
                              nn_baseline if est.site_gradient is not None else None)
    if est.site_gradient is not None and nn_baseline is not None:
        it = _held_fixed(nn_baseline, it)
    return plan, _finite(plan, it)


def _held_fixed(module: nn.Module, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The chunks, drawn with ``module`` in eval mode (no running statistics updated); its mode and its
    parameters' ``.grad`` restored afterwards."""
    was_training = module.training
    grads = [p.grad for p in module.parameters()]
    module.eval()
    try:
        yield from chunks
    finally:
        module.train(was_training)
        for p, g in zip(module.parameters(), grads):
            p.grad = g


def _finite(plan: _Plan, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The chunks, or :class:`~pyro_vae.errors.NonFiniteLossError` at the first non-finite gradient entry."""
    names = None
    for chunk in chunks:
        bad = ~torch.isfinite(chunk)
        if bool(bad.any()):
            if names is None:
                names = [f"{g} {n}" for g, items in plan.groups.items() for n, p in items for _ in range(p.numel())]
            cols = bad.any(0).nonzero().flatten().tolist()
            raise NonFiniteLossError(message(
                "gradient samples", "finite values",
                f"{int(bad.sum())} NaN or infinite entries, in the columns of "
                + ", ".join(dict.fromkeys(names[c] for c in cols)),
                "check the parameters' current values and the model's log-densities at them (run the loss once "
                "under pyro.enable_validation(True))"))
        yield chunk


def gradient_samples(vae: nn.Module, x: torch.Tensor, estimator: str | Estimator = "pathwise",
                     num_samples: int = 1000, *, num_particles: int = 1, method: str = "vectorized",
                     elbo: str = "trace", groups: bool = False, nn_baseline: nn.Module | None = None,
                     baseline_warmup: int = 100, chunk_size: int | None = None,
                     seed: int | None = None, context: Mapping[str, Any] | None = None,
                     **model_kwargs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """Independent estimates of the gradient of the loss ``-ELBO(x)`` (the negative IWAE bound for
    ``elbo="iwae"``; nats, summed over the batch) at the current parameters, with respect to every parameter the
    model and guide traces touch.

    Args:
        vae: a :class:`pyro_vae.VAE`, a :class:`pyro_vae.ModelGuidePair` or any object with ``model``/``guide``
            methods taking ``x`` (``model_kwargs`` such as ``num_data`` passed on).
        x: the batch ``(batch, *data_shape)``; each estimate is the gradient of the loss of the whole batch.
        estimator: a name of :data:`pyro_vae.infer.estimators.ESTIMATORS`.
        num_samples: number of independent estimates.
        num_particles: particles averaged inside each estimate (vectorized); the importance samples ``K`` of
            ``elbo="iwae"``.
        method: ``"vectorized"`` (``torch.func.vmap``) or ``"loop"`` (Pyro's ``loss_and_grads``).
        elbo: ``"trace"`` (``Trace_ELBO``, Monte Carlo KL), ``"meanfield"`` (``TraceMeanField_ELBO``:
            analytic KL where one is registered, the Monte Carlo estimate elsewhere, with a warning naming
            those sites; pathwise-type estimators only) or ``"iwae"`` (the loss is then the negative
            importance-weighted bound, :class:`pyro_vae.infer.iwae.ImportanceWeightedELBO`; estimators
            ``"pathwise"`` and ``"dreg"``).
        groups: return ``{"encoder": (num_samples, D_enc), "decoder": ..., ...}`` instead of one tensor.
        nn_baseline: baseline module for ``score-function-neural-baseline``, or the learned module of a per-site
            estimator that has one (``"muprop"``, ``"nvil"``, ``"rebar"``, ``"relax"``), held fixed (eval mode) while
            sampling (default: a fresh one). NVIL's guide columns are the gradient divided by its ``max(1, sqrt(v))``.
        baseline_warmup: ``TraceGraph_ELBO`` calls that warm up the decaying-average baseline before it is
            frozen for sampling.
        chunk_size: estimates computed per vmapped call (default from the batch size and the device).
        seed: seeds Pyro and torch first.
        context: the batch's named context, passed to the model and guide as keyword arguments
            (``vae.model(x, **context)``): per-data-point values one row per point of ``x`` (``(batch, ...)``),
            global values whole (:func:`pyro_vae.models.context.check_context`).
        **model_kwargs: passed to model and guide (e.g. ``num_data``).

    Returns:
        ``(num_samples, num_params)`` with the columns of :func:`parameter_groups` ``(vae, x,
        **model_kwargs)``: the VAE's module parameters, then the ``pyro.param`` entries the traces declare
        (gradient with respect to the unconstrained value), or a dict of them per group.

    Raises:
        ConfigError: for a bad argument; with ``method="vectorized"``, for a guide site it cannot draw, a
            ``pyro.module`` registration of a module outside the VAE, or traces whose ``pyro.param``
            statements change between draws (``method="loop"`` covers the first two).
        NonFiniteLossError: a gradient entry is NaN or infinite (the message names the parameters).
        DataError: a per-data-point context value whose first dimension is not ``batch``.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    plan, chunks = _iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo, nn_baseline,
                                   baseline_warmup, chunk_size, _with_context(vae, x, context, model_kwargs))
    out = torch.cat(list(chunks))
    return _split(out, plan.groups) if groups else out


def _with_context(vae: Any, x: torch.Tensor, context: Mapping[str, Any] | None,
                  model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments: ``model_kwargs`` and the checked ``context`` (its per-data-point values one
    row per point of ``x``).

    Raises:
        ConfigError: a context name also among ``model_kwargs``."""
    ctx = check_context("context", context, x.shape[0], declared_shapes(vae), x.device)
    both = sorted(set(ctx) & set(model_kwargs))
    if both:
        raise ConfigError(message("context", "names not also passed as keyword arguments", f"{both} in both",
                                  "pass each value once, in context"))
    return {**model_kwargs, **ctx}


# ------------------------------------------------------------------------------------------ statistics
def summarize(samples: torch.Tensor, exact: torch.Tensor | None = None) -> dict[str, Any]:
    """Statistics of ``(num_samples, D)`` gradient samples: ``mean_variance`` ``(1/D) tr Cov``,
    ``total_variance`` ``tr Cov``, ``snr`` (mean over coordinates of ``|mean| / std``, coordinates with
    zero variance left out), and with ``exact``: ``bias`` ``|mean - exact|_2``, ``relative_bias``
    ``|mean - exact| / |exact|`` and ``max_bias_z`` (the largest ``|mean - exact| / se`` over the coordinates
    with variance; ``se = std / sqrt(n)``, the standard error of the mean, except on a coordinate whose spread
    is rounding, ``std <= 256 eps rms`` (``eps`` the machine epsilon of the coarser floating-point type of the
    samples and ``exact``, float32: ``256 eps = 3.1e-5``; ``rms`` the coordinate's root mean square sample),
    where ``se = std sqrt(1 + 1/n)``: the rounding of a float computation does not average out over samples,
    so an estimator exact but for rounding (its samples agree to float precision) has a ``max_bias_z`` of
    order 1 instead of one growing with ``n``)."""
    s = samples.double()
    return _stats(s.shape[0], s.sum(0), s.pow(2).sum(0), exact, _rounding_eps(samples, exact))


def _rounding_eps(samples: torch.Tensor, exact: torch.Tensor | None) -> float:
    """The machine epsilon of the coarser floating-point type of ``samples`` and ``exact`` (0 for integers)."""
    return max((torch.finfo(t.dtype).eps for t in (samples, exact) if t is not None and t.is_floating_point()),
               default=0.0)


def _stats(n: int, total: torch.Tensor, total_sq: torch.Tensor, exact: torch.Tensor | None,
           eps: float = 0.0) -> dict[str, Any]:
    mean = total / n
    var = ((total_sq - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0)
    std = var.sqrt()
    live = std > 0
    out: dict[str, Any] = {
        "num_samples": n,
        "dim": int(mean.numel()),
        "mean_variance": float(var.mean()),
        "total_variance": float(var.sum()),
        "snr": float((mean[live].abs() / std[live]).mean()) if bool(live.any()) else math.nan,
        "mean_norm": float(mean.norm()),
        "bias": None, "relative_bias": None, "max_bias_z": None,
    }
    if exact is not None:
        e = exact.double().reshape(-1).to(mean.device)
        diff = mean - e
        # a spread below 256 eps of the samples' magnitude is rounding, which does not average out: the
        # mean is then no closer to the exact value than one sample, and the standard error is the spread
        rounding = var <= (256 * eps) ** 2 * (total_sq / n)
        se = (var / n + torch.where(rounding, var, torch.zeros_like(var))).sqrt()
        out["bias"] = float(diff.norm())
        out["relative_bias"] = float(diff.norm() / e.norm().clamp_min(1e-300))
        out["max_bias_z"] = float((diff[live].abs() / se[live]).max()) if bool(live.any()) else math.nan
    return out


def gradient_statistics(vae: nn.Module, x: torch.Tensor, estimator: str | Estimator = "pathwise",
                        num_samples: int = 1000, *, num_particles: int = 1, method: str = "vectorized",
                        elbo: str = "trace", exact: torch.Tensor | None = None,
                        nn_baseline: nn.Module | None = None, baseline_warmup: int = 100,
                        chunk_size: int | None = None, seed: int | None = None,
                        context: Mapping[str, Any] | None = None, **model_kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per-group (and ``"all"``) :func:`summarize` statistics of :func:`gradient_samples`, accumulated
    chunk by chunk so that ``num_samples x num_params`` never has to fit in memory. Each entry also records
    ``seconds`` (wall time of the sampling, synchronized on CUDA; a baseline's warm-up is not counted), and
    ``analytic_kl_sites`` / ``monte_carlo_kl_sites``: the latent sites whose KL term is the closed form and
    those whose KL is estimated by Monte Carlo (every latent site under ``elbo="trace"``).

    Args:
        exact: the exact gradient ``(num_params,)`` in the column order of :func:`parameter_groups`
            ``(vae, x, **model_kwargs)`` (e.g. :func:`exact_gradient`), for the bias.
        Others: as in :func:`gradient_samples`.

    Raises:
        ConfigError, NonFiniteLossError: as :func:`gradient_samples`; ConfigError also for an ``exact`` of
            the wrong size.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    plan, chunks = _iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo, nn_baseline,
                                   baseline_warmup, chunk_size,  # baselines warmed up here, untimed
                                   _with_context(vae, x, context, model_kwargs))
    groups = plan.groups
    dim = sum(p.numel() for items in groups.values() for _, p in items)
    if exact is not None and exact.numel() != dim:
        raise ConfigError(message(
            "exact", f"{dim} numbers, one per column of parameter_groups(vae, x) ({', '.join(groups)})",
            f"{exact.numel()}", "compute it with flat_gradient(vae, loss, x) (exact_gradient covers a "
            "linear-Gaussian VAE without pyro.param entries)"))
    sync()
    start = time.perf_counter()
    total = total_sq = None
    n, eps = 0, 0.0
    for chunk in chunks:
        eps = _rounding_eps(chunk, exact)
        c = chunk.double()
        total = c.sum(0) if total is None else total + c.sum(0)
        total_sq = c.pow(2).sum(0) if total_sq is None else total_sq + c.pow(2).sum(0)
        n += c.shape[0]
    sync()
    seconds = time.perf_counter() - start
    assert total is not None and total_sq is not None  # num_samples >= 1: at least one chunk
    parts_t, parts_q = _split(total, groups), _split(total_sq, groups)
    parts_e = _split(exact.reshape(-1), groups) if exact is not None else {}
    out = {g: _stats(n, parts_t[g], parts_q[g], parts_e.get(g), eps) for g in groups}
    out["all"] = _stats(n, total, total_sq, exact, eps)
    for v in out.values():
        v["seconds"] = seconds
        v["analytic_kl_sites"] = list(plan.analytic_kl)
        v["monte_carlo_kl_sites"] = list(plan.monte_carlo_kl)
    return out
