"""Gradient estimators for the ELBO, chosen per run on the same model/guide pair.

Pyro decides the estimator per guide site from the distribution (``has_rsample`` and
``Distribution.score_parts``), not from the ELBO; this module only changes the distributions the guide
samples from, through an effect handler, and lets Pyro's ``Trace_ELBO`` / ``TraceGraph_ELBO`` do the rest:

- ``pathwise``: the reparameterization gradient (Kingma & Welling 2014; Rezende et al. 2014);
- ``score-function``: REINFORCE (Williams 1992), by wrapping the guide site in :class:`ScoreFunction`;
- ``score-function-baseline``: REINFORCE with Pyro's decaying-average baseline under ``TraceGraph_ELBO``;
- ``score-function-neural-baseline``: REINFORCE with an input-dependent learned baseline (Mnih & Gregor 2014);
- per-site estimators, whose guide sites are wrapped in :class:`SiteGradient` and whose ELBO adds the term of
  :mod:`pyro_vae.infer.site_gradients`: ``score-function-mean-baseline``, ``score-function-optimal-cv``,
  ``score-function-delta-cv`` (control variates; Mohamed et al. 2020, section 7), ``rloo`` (leave-one-out; Kool
  et al. 2019) and ``measure-valued`` (coupled weak derivative of a Gaussian; Mohamed et al. 2020, section 6);
  for discrete sites (:mod:`pyro_vae.infer.discrete`) ``enumerate`` (the exact expectation over the site's
  configurations), ``arm`` (Yin & Zhou 2019), ``disarm`` (Dong et al. 2020), ``muprop`` (Gu et al. 2016) and
  ``nvil`` (Mnih & Gregor 2014);
- ``stl``: sticking the landing (Roeder et al. 2017), the pathwise gradient without the score term of ``log q``,
  by wrapping the guide site in :class:`~pyro_vae.infer.path_gradient.PathGradient` (the ELBO);
- ``dreg``: the doubly reparameterized gradient of the IWAE bound (Tucker et al. 2019), the same wrapper read by
  :class:`~pyro_vae.infer.iwae.ImportanceWeightedELBO` (``make_elbo("iwae", K, "dreg")``);
- for categorical latents: ``relaxed`` (Gumbel-softmax / Concrete; Jang et al. 2017, Maddison et al. 2017),
  ``straight-through`` (Bengio et al. 2013; Jang et al. 2017), and the ``score-function`` variants on the
  exact ``OneHotCategorical`` in both model and guide.

The ELBO of an estimator is built by :func:`pyro_vae.infer.elbo.make_elbo` (``make_elbo(elbo, num_particles,
estimator)``); this module holds the estimators, the handler and the ELBO classes it builds.

``dist.Normal(...).to_event(1).has_rsample_(False)`` raises, and ``.has_rsample_(False).to_event(1)`` fails
inside a plate on pyro-ppl 1.9; :class:`ScoreFunction` is a thin distribution wrapper that works at any
position in the stack of ``plate``, ``expand`` and ``to_event``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence, register_kl
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from pyro_vae.distributions.relaxed import ExpOneHotCategorical, straight_through_override
from pyro_vae.distributions.relaxed_bernoulli import LogitBernoulli, is_relaxed_bernoulli
from pyro_vae.distributions.wrapped import Wrapped
from pyro_vae.encoders import BernoulliEncoder, RelaxedCategoricalEncoder
from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.path_gradient import PathGradient, check_independent_parameters, latent_inputs
from pyro_vae.networks import MLP
from pyro_vae.pyro_internals import ParticleHandlerMixin

__all__ = [
    "ScoreFunction",
    "EstimatorMessenger",
    "score_function",
    "Estimator",
    "ESTIMATORS",
    "get_estimator",
    "check_estimator",
    "default_estimator",
    "exact_discrete_latent",
    "check_mean_field",
    "check_discrete_objective",
    "NeuralBaseline",
    "EstimatorTrace_ELBO",
    "EstimatorTraceMeanField_ELBO",
    "EstimatorTraceGraph_ELBO",
    "BASELINE_PARAM",
    "straight_through_override",
    "unwrap_independent",
    "SiteGradient",
    "LATENT_INPUTS",
]

#: Name prefix of the decaying-average baseline Pyro keeps in the param store (``+ site name``).
BASELINE_PARAM = "__baseline_avg_downstream_cost_"

#: Key of a guide site's ``infer`` dict under which :class:`EstimatorMessenger` (under Pyro's validation, for a
#: per-site estimator) records the earlier latent sites, wrapped in :class:`SiteGradient`, from whose values the
#: site's distribution is computed (:func:`~pyro_vae.infer.path_gradient.latent_inputs`): a tuple of names, read by
#: :func:`pyro_vae.infer.site_gradients.check_fixed_sites`.
LATENT_INPUTS = "pyro_vae_latent_inputs"


class ScoreFunction(Wrapped):
    """A distribution that samples and scores like ``base`` but has no ``rsample``, so every Pyro ELBO
    treats its site with the score-function (REINFORCE) estimator.

    ``sample`` returns a detached draw of ``base``; ``log_prob``, ``support``, ``mean``, ``variance``,
    ``entropy`` and ``enumerate_support`` delegate; ``expand`` and ``to_event`` keep the wrapper, so the
    site works inside plates and with event dimensions (:class:`pyro_vae.distributions.wrapped.Wrapped`).

    Args:
        base: any distribution (reparameterizable or not).
    """

    has_rsample = False

    def __init__(self, base: torch.distributions.Distribution, validate_args: bool | None = None) -> None:
        super().__init__(base)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] =
               torch.Size()) -> torch.Tensor:  # noqa: B008 (torch.Size is immutable)
        with torch.no_grad():
            return self.base.sample(sample_shape).detach()


class SiteGradient(ScoreFunction):
    """A guide distribution whose site gets its gradient from a per-site estimator of
    :mod:`pyro_vae.infer.site_gradients` (control variates, leave-one-out, measure-valued), not from Pyro.

    It samples a detached draw of ``base`` (``rsample`` too: ``has_rsample`` is ``True`` so that
    ``TraceMeanField_ELBO`` accepts the site) and its ``score_parts`` carry neither a score-function term nor a
    differentiable entropy term: ``(log_prob, 0, log_prob.detach())``. The ELBO's value is unchanged; the
    gradient with respect to the guide's parameters at this site is the surrogate term the per-site estimator
    adds. ``kl_divergence(SiteGradient(q), p)`` is ``kl_divergence(q, p)``.

    Args:
        base: any distribution (the estimator checks the families it applies to).
    """

    has_rsample = True

    def rsample(self, sample_shape: Any = ()) -> torch.Tensor:
        return self.sample(torch.Size(sample_shape))

    def score_parts(self, value: torch.Tensor) -> ScoreParts:
        log_prob = self.log_prob(value)
        no_score: Any = 0  # Pyro's is_identically_zero: the number 0, not a tensor
        return ScoreParts(log_prob=log_prob, score_function=no_score, entropy_term=log_prob.detach())



@register_kl(SiteGradient, torch.distributions.Distribution)
def _kl_site_gradient(p: SiteGradient, q: torch.distributions.Distribution) -> torch.Tensor:
    return kl_divergence(cast(Any, p.base), q)


# ------------------------------------------------------------------------------------------ estimators
@dataclass(frozen=True)
class Estimator:
    """What an estimator does to the latent sites.

    Attributes:
        name: the name users pass (``fit(..., estimator=name)``, ``--estimator name``).
        score_function: force REINFORCE on the guide's latent sites.
        baseline: ``None``, ``"decaying"`` (Pyro's decaying average of the downstream cost) or ``"neural"``.
        categorical: for relaxed-categorical latents: ``"relaxed"``, ``"straight-through"`` or ``"exact"``
            (score function on ``OneHotCategorical``); ``None`` leaves the encoder's choice.
        gaussian: whether it applies to reparameterizable (e.g. Gaussian) latents.
        site_gradient: a per-site estimator of :mod:`pyro_vae.infer.site_gradients` (``"mean-baseline"``,
            ``"optimal-cv"``, ``"delta-cv"``, ``"rloo"``, ``"measure-valued"``); its guide sites are wrapped in
            :class:`SiteGradient` and its ELBO adds the estimator's surrogate term.
        cv_samples: independent draws per estimate that the mean baseline or the optimal coefficient is
            estimated from (``site_gradient`` ``"mean-baseline"`` and ``"optimal-cv"``).
        path_derivative: evaluate the guide's ``log q`` with detached parameters at the reparameterized sample
            (:class:`~pyro_vae.infer.path_gradient.PathGradient`): ``"stl"`` and ``"dreg"``.
        objectives: the objectives whose gradient it estimates: ``"elbo"`` and/or ``"iwae"`` (the
            importance-weighted bound of :mod:`pyro_vae.infer.iwae`).
        fixed_sites: for a per-site estimator, whether its term evaluates the site's cost at values other than
            the draw (or otherwise relies on the other latents being held at their draws): it is then unbiased
            only when no later guide site's distribution is computed from the site's value, and such a guide is
            refused (:func:`pyro_vae.infer.site_gradients.check_fixed_sites`). ``False`` for a term that reads the
            cost at the draw only (``"rloo"``, ``"nvil"``: unbiased for any guide).
    """

    name: str
    score_function: bool = False
    baseline: str | None = None
    categorical: str | None = None
    gaussian: bool = True
    description: str = ""
    path_derivative: bool = False
    objectives: tuple[str, ...] = ("elbo",)
    site_gradient: str | None = None
    cv_samples: int = 0
    fixed_sites: bool = True


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("pathwise", description="reparameterization gradient (relaxed sample for categorical latents)",
              objectives=("elbo", "iwae")),
    Estimator("score-function", True, None, "exact", description="REINFORCE, Monte Carlo cost, no baseline"),
    Estimator("score-function-baseline", True, "decaying", "exact",
              description="REINFORCE under TraceGraph_ELBO with a decaying-average baseline"),
    Estimator("score-function-neural-baseline", True, "neural", "exact",
              description="REINFORCE under TraceGraph_ELBO with a learned input-dependent baseline"),
    Estimator("relaxed", categorical="relaxed", gaussian=False,
              description="Gumbel-softmax / Concrete relaxation, pathwise (categorical or relaxed Bernoulli latents)",
              objectives=("elbo", "iwae")),
    Estimator("straight-through", categorical="straight-through", gaussian=False,
              description="hard one-hot (or bit) forward, relaxed gradient backward (categorical or relaxed "
                          "Bernoulli latents)",
              objectives=("elbo", "iwae")),
    Estimator("stl", path_derivative=True,
              description="sticking the landing: pathwise without the score term of log q (Roeder et al. 2017)"),
    Estimator("dreg", path_derivative=True, objectives=("iwae",),
              description="doubly reparameterized IWAE gradient (Tucker et al. 2019); needs elbo=\"iwae\""),
)}

#: Per-site estimators (:mod:`pyro_vae.infer.site_gradients`): score function with control variates,
#: leave-one-out, measure-valued.
ESTIMATORS.update({e.name: e for e in (
    Estimator("score-function-mean-baseline", categorical="exact", site_gradient="mean-baseline", cv_samples=8,
              description="REINFORCE minus the mean cost of 8 independent draws of the site"),
    Estimator("score-function-optimal-cv", site_gradient="optimal-cv", cv_samples=8,
              description="REINFORCE with the variance-optimal constant baseline per parameter, estimated from "
                          "8 independent draws (Gaussian latents)"),
    Estimator("score-function-delta-cv", site_gradient="delta-cv",
              description="REINFORCE with the second-order Taylor (delta-method) control variate (Gaussian latents)"),
    Estimator("rloo", categorical="exact", site_gradient="rloo", fixed_sites=False,
              description="REINFORCE leave-one-out: each of K >= 2 particles baselined by the others' mean cost"),
    Estimator("measure-valued", site_gradient="measure-valued",
              description="coupled measure-valued derivative, Weibull and double-sided Maxwell (Gaussian latents)"),
)})

#: Per-site estimators for discrete latents (:mod:`pyro_vae.infer.discrete`).
ESTIMATORS.update({e.name: e for e in (
    Estimator("enumerate", categorical="exact", site_gradient="enumerate",
              description="exact expectation over the site's configurations, 1 + K^D model evaluations for D "
                          "variables of K values (Bernoulli: K = 2; categorical latents; at most 4096 "
                          "configurations)"),
    Estimator("arm", site_gradient="arm",
              description="augment-REINFORCE-merge, one antithetic pair (Yin & Zhou 2019; Bernoulli latents)"),
    Estimator("disarm", site_gradient="disarm",
              description="ARM with the augmentation integrated out, one antithetic pair (Dong et al. 2020; "
                          "Bernoulli latents)"),
    Estimator("muprop", site_gradient="muprop",
              description="REINFORCE with the first-order Taylor control variate at the mean-field point "
                          "(Gu et al. 2016; Bernoulli latents)"),
    Estimator("nvil", categorical="exact", site_gradient="nvil", fixed_sites=False,
              description="REINFORCE with a learned input-dependent baseline and variance normalization "
                          "(Mnih & Gregor 2014)"),
)})

#: Discrete-latent estimators with a relaxation or a multi-sample bound: REBAR and RELAX (:mod:`pyro_vae.infer.rebar`),
#: Gumbel-Rao (:mod:`pyro_vae.infer.gumbel_rao`), VIMCO (:mod:`pyro_vae.infer.vimco`).
ESTIMATORS.update({e.name: e for e in (
    Estimator("rebar", site_gradient="rebar",
              description="REINFORCE with the Concrete control variate and learned temperature and scale, unbiased "
                          "(Tucker et al. 2017; Bernoulli latents)"),
    Estimator("relax", site_gradient="relax",
              description="REBAR plus a learned surrogate network, trained to minimize the gradient variance "
                          "(Grathwohl et al. 2018; Bernoulli latents)"),
    Estimator("gumbel-rao", categorical="straight-through", gaussian=False, site_gradient="gumbel-rao", cv_samples=10,
              description="straight-through Gumbel-softmax Rao-Blackwellized over 10 conditional Gumbel draws "
                          "(Paulus et al. 2021; categorical latents)"),
    Estimator("vimco", categorical="exact", objectives=("iwae",),
              description="multi-sample REINFORCE of the IWAE bound with leave-one-out learning signals (Mnih & "
                          "Rezende 2016); needs elbo=\"iwae\" and K >= 2"),
)})


def get_estimator(estimator: str | Estimator) -> Estimator:
    """The :class:`Estimator` of a name (or the object itself).

    Raises:
        ConfigError: an unknown name, or neither a string nor an :class:`Estimator` (e.g. a dict of estimators
            per site: one estimator applies to every latent site)."""
    if isinstance(estimator, Estimator):
        return estimator
    if not isinstance(estimator, str):
        raise ConfigError(message(
            "estimator", "one name of ESTIMATORS (a string: " + ", ".join(ESTIMATORS) + ") or an Estimator",
            f"{type(estimator).__name__} {estimator!r}"[:200],
            "pass one estimator name per call; it applies to every latent guide site"))
    if estimator not in ESTIMATORS:
        raise ConfigError(message("estimator", "one of " + ", ".join(ESTIMATORS), repr(estimator),
                                  "pick a known estimator name"))
    return ESTIMATORS[estimator]


def exact_discrete_latent(vae: nn.Module) -> bool:
    """Whether ``vae``'s latent site has no ``rsample``: an exact Bernoulli latent (``VAE(latent="bernoulli")``
    without ``relaxed`` or ``straight_through``). A categorical latent is relaxed, hence reparameterizable."""
    encoder = getattr(vae, "encoder", None)
    return isinstance(encoder, BernoulliEncoder) and not encoder.relaxed


def default_estimator(vae: nn.Module, non_reparameterized: Iterable[str] = (), elbo: Any = None) -> str:
    """The estimator :func:`pyro_vae.fit` and ``pyro-vae train`` use when none is given (``estimator=None``).

    When a latent guide site has no ``rsample`` (an exact discrete latent: :func:`exact_discrete_latent` of a VAE,
    or the names ``non_reparameterized`` of such sites of a model/guide pair's guide): ``"vimco"`` (multi-sample
    REINFORCE with leave-one-out learning signals, Mnih & Rezende 2016) under the IWAE bound (``elbo="iwae"``, the
    only estimator of that bound for such a site), else ``"score-function"`` (REINFORCE, Williams 1992). Otherwise
    ``"pathwise"`` (the reparameterization gradient), under either objective."""
    return default_estimator_name(exact_discrete_latent(vae) or any(True for _ in non_reparameterized), elbo)


def default_estimator_name(discrete: bool, elbo: Any = None) -> str:
    """The rule of :func:`default_estimator` for a model whose guide has (``discrete``) or has no latent site
    without ``rsample``, under the objective ``elbo`` (``"iwae"`` for the IWAE bound): ``"vimco"``,
    ``"score-function"`` or ``"pathwise"``."""
    if discrete:
        return "vimco" if elbo == "iwae" else "score-function"
    return "pathwise"


def check_mean_field(estimator: str | Estimator, elbo: Any, site: str = "z") -> Estimator:
    """The :class:`Estimator` of ``estimator`` when it can train an exact discrete latent (a guide site ``site``
    without ``rsample``) under the objective ``elbo``.

    Raises:
        ConfigError: ``elbo`` is ``"meanfield"`` (``TraceMeanField_ELBO``, which trains only a reparameterized
            guide) and the estimator is not per site (only a per-site estimator's guide wrapper,
            :class:`SiteGradient`, has ``rsample``): the message names the site, the ELBO and the fixes."""
    est = get_estimator(estimator)
    if elbo == "meanfield" and est.site_gradient is None:
        per_site = ", ".join(f'"{n}"' for n in ("rloo", "arm", "disarm", "nvil", "enumerate"))
        raise ConfigError(message(
            f'elbo "meanfield" (TraceMeanField_ELBO) with estimator "{est.name}" at site "{site}"',
            "a reparameterized guide site (TraceMeanField_ELBO trains only those) or a per-site estimator",
            f'an exact discrete latent at site "{site}" (no rsample) under estimator "{est.name}"',
            f'pass elbo="trace" (--elbo trace), or a per-site estimator such as {per_site} (the mean-field '
            "ELBO accepts those), or build the VAE with relaxed=True (--relaxed)"))
    return est


def check_discrete_objective(estimator: str | Estimator, elbo: Any, site: str = "z", vae: bool = True) -> Estimator:
    """The :class:`Estimator` of ``estimator`` when it estimates the gradient of the objective ``elbo`` at an
    exact discrete latent (a guide site ``site`` without ``rsample``).

    Raises:
        ConfigError: ``elbo="iwae"`` (the IWAE bound) with an estimator other than ``"vimco"``, the one estimator
            of that bound for a site without ``rsample``; or an ELBO (``"trace"``, ``"meanfield"``) with an
            estimator of the IWAE bound only (``"vimco"``, ``"dreg"``). The message names fixes that apply to
            the discrete latent: ``estimator="vimco"`` under the bound, an ELBO estimator such as ``"rloo"``,
            ``"arm"`` or ``"disarm"`` under the ELBO; a path-derivative estimator (``"stl"``, ``"dreg"``),
            which needs a reparameterized site. ``vae``: the latent is a :class:`pyro_vae.VAE`'s (the message
            adds ``relaxed=True``), not a model/guide pair's."""
    est = get_estimator(estimator)
    elbo_estimators = '"score-function", "rloo", "arm" or "disarm"'
    relaxed = ", or build the VAE with relaxed=True (a reparameterized latent)" if vae else ""
    if elbo == "iwae" and est.name != "vimco":
        raise ConfigError(message(
            f'elbo "iwae" with estimator "{est.name}" at site "{site}"',
            'estimator "vimco" (the one estimator of the IWAE bound for a latent without rsample)',
            f'an exact discrete latent at site "{site}" (no rsample) under estimator "{est.name}"',
            f'pass estimator="vimco" with num_particles=K >= 2, or elbo="trace" with an ELBO estimator such as '
            f'{elbo_estimators}{relaxed}'))
    if isinstance(elbo, str) and elbo != "iwae" and "elbo" not in est.objectives:
        raise ConfigError(message(
            f'elbo "{elbo}" with estimator "{est.name}" at site "{site}"', "an estimator of the ELBO",
            f'"{est.name}", an estimator of the IWAE bound, at an exact discrete latent (no rsample)',
            f'pass elbo="iwae" with estimator="vimco" and num_particles=K >= 2, or an ELBO estimator such as '
            f'{elbo_estimators}'))
    if est.path_derivative:
        raise ConfigError(message(
            f'estimator "{est.name}" at site "{site}"',
            "a reparameterized guide site (the path-derivative estimators detach its parameters)",
            f'an exact discrete latent at site "{site}" (no rsample)',
            f'pass an ELBO estimator such as {elbo_estimators}, or elbo="iwae" with estimator="vimco" and '
            f'num_particles=K >= 2{relaxed}'))
    return est


def check_estimator(estimator: str | Estimator, vae: nn.Module, elbo: Any = None) -> Estimator:
    """The :class:`Estimator`, or :class:`ConfigError` when it does not fit the VAE's latent (``relaxed`` and
    ``straight-through`` need a relaxed-categorical or relaxed Bernoulli encoder) or, for an exact discrete
    latent, the objective ``elbo`` (:func:`check_discrete_objective`, :func:`check_mean_field`). The pathwise
    estimator at a latent without ``rsample`` is refused where the ELBO draws the site
    (:class:`EstimatorMessenger`)."""
    est = get_estimator(estimator)
    if exact_discrete_latent(vae):
        check_mean_field(est, elbo, site=_site_name(vae))
        check_discrete_objective(est, elbo, site=_site_name(vae))
    encoder = getattr(vae, "encoder", None)
    relaxed_bernoulli = isinstance(encoder, BernoulliEncoder) and encoder.relaxed and est.site_gradient is None
    if not est.gaussian and not isinstance(encoder, RelaxedCategoricalEncoder) and not relaxed_bernoulli:
        raise ConfigError(message(f'estimator "{est.name}"',
                                  "a VAE with categorical latents (or relaxed Bernoulli ones)",
                                  f"encoder {type(getattr(vae, 'encoder', None)).__name__}",
                                  'build the VAE with relaxed=True (--relaxed), or use an estimator for exact '
                                  'Bernoulli latents ("score-function", "rloo", "arm", "disarm", "rebar", ...)'
                                  if isinstance(encoder, BernoulliEncoder) else
                                  'build the VAE with latent="categorical" (--latent categorical) or use '
                                  '"pathwise" or a "score-function" estimator'))
    return est


def _site_name(vae: nn.Module) -> str:
    """The name of a VAE's latent site (``"z"`` with its prefix), ``"z"`` for a module without ``site``."""
    site = getattr(vae, "site", None)
    return str(site("z")) if callable(site) else "z"


def unwrap_independent(fn: torch.distributions.Distribution) -> tuple[torch.distributions.Distribution, list[int]]:
    """The distribution inside any number of ``Independent`` wrappers (``.to_event``) and the
    ``reinterpreted_batch_ndims`` of each wrapper, outermost first."""
    dims: list[int] = []
    while isinstance(fn, torch.distributions.Independent):
        dims.append(fn.reinterpreted_batch_ndims)
        fn = fn.base_dist
    return fn, dims


def _rewrap_independent(fn: torch.distributions.Distribution, dims: list[int]) -> torch.distributions.Distribution:
    for d in reversed(dims):
        fn = dist.Independent(fn, d)
    return fn


def _is_relaxed_categorical(fn: Any) -> TypeGuard[torch.distributions.RelaxedOneHotCategorical | ExpRelaxedCategorical]:
    """A relaxed one-hot categorical on the simplex (torch's ``RelaxedOneHotCategorical``) or in log space
    (torch's ``ExpRelaxedCategorical``, :class:`pyro_vae.distributions.relaxed.ExpRelaxedOneHotCategorical`)."""
    return isinstance(fn, (torch.distributions.RelaxedOneHotCategorical, ExpRelaxedCategorical))


def _convert_categorical(fn: torch.distributions.Distribution, mode: str | None, role: str,
                         site: str) -> torch.distributions.Distribution:
    """The distribution ``mode`` asks for in place of a relaxed one-hot categorical (same logits, same shapes,
    same representation of the value). ``"exact"``: the categorical itself
    (:class:`pyro_vae.distributions.relaxed.ExpOneHotCategorical` for a log-space latent, ``OneHotCategorical``
    on the simplex). ``"relaxed"`` and
    ``"straight-through"`` leave the distribution as it is: the latent is the same relaxed draw, and the
    straight-through estimator changes only what the consumer of a log-space latent computes from it
    (:func:`straight_through_override`)."""
    base, dims = unwrap_independent(fn)
    if mode == "exact" and is_relaxed_bernoulli(base):  # the exact Bernoulli in the same (logit-space) values
        return _rewrap_independent(LogitBernoulli(logits=cast(Any, base).logits), dims)
    if mode is None or not _is_relaxed_categorical(base):
        return fn
    simplex = isinstance(base, torch.distributions.RelaxedOneHotCategorical)
    if mode == "exact":
        new: torch.distributions.Distribution = (dist.OneHotCategorical(logits=base.logits) if simplex
                                                 else ExpOneHotCategorical(logits=base.logits))
        return _rewrap_independent(new, dims)
    if mode == "straight-through" and simplex:
        raise ConfigError(message(
            f'estimator "straight-through" at site "{site}"',
            "a relaxed categorical latent in log space (pyro_vae.distributions.relaxed.ExpRelaxedOneHotCategorical), "
            "whose consumer maps it with pyro_vae.distributions.relaxed.to_simplex",
            f"{type(base).__name__} (values on the simplex)",
            'sample the log-space latent (a pyro_vae.VAE with latent="categorical" does), or use "relaxed"'))
    return fn


class EstimatorMessenger(Messenger):
    """Effect handler that makes the latent sites of a model or guide use one :class:`Estimator`.

    On the guide (``role="guide"``) it wraps each latent site's distribution in :class:`ScoreFunction`
    when the estimator is a score-function one and attaches the baseline options Pyro's
    ``TraceGraph_ELBO`` reads from ``infer["baseline"]``. On both roles it swaps relaxed one-hot
    categoricals for the exact categorical in the same representation (score-function estimators); on the
    model role, ``"straight-through"`` / ``"relaxed"`` decide how :meth:`pyro_vae.VAE.decoder_input` maps
    the log-space latent to the decoder (:func:`straight_through_override`).

    Under Pyro's validation (with gradients enabled) it also checks the guide's dependencies between latent sites:
    for ``"stl"``/``"dreg"`` it refuses a site whose parameters are computed from an earlier latent
    (:func:`~pyro_vae.infer.path_gradient.check_independent_parameters`); for a per-site estimator it returns a
    leaf that requires grad in place of each :class:`SiteGradient` draw (the trace keeps the draw) and records in a
    later site's ``infer[LATENT_INPUTS]`` the sites its distribution is computed from
    (:func:`~pyro_vae.infer.path_gradient.latent_inputs`), which the ELBO refuses where the estimator needs the
    other sites fixed (:func:`pyro_vae.infer.site_gradients.check_fixed_sites`).

    Args:
        estimator: name or :class:`Estimator`.
        role: ``"guide"`` or ``"model"``.
        sites: names of the sites to change (default: every non-observed sample site).
        baseline_beta: decay of the average baseline.
        nn_baseline: module mapping ``nn_baseline_input`` to one baseline value per data point.
        nn_baseline_input: its input, e.g. the data batch.
    """

    def __init__(self, estimator: str | Estimator = "score-function", role: str = "guide",
                 sites: Iterable[str] | None = None, baseline_beta: float = 0.9,
                 nn_baseline: nn.Module | None = None, nn_baseline_input: torch.Tensor | None = None) -> None:
        super().__init__()
        if role not in ("guide", "model"):
            raise ConfigError(message("role", '"guide" or "model"', repr(role), 'pass role="guide"'))
        self.estimator = get_estimator(estimator)
        self.role = role
        self.sites = None if sites is None else set(sites)
        self.baseline_beta = float(baseline_beta)
        self.nn_baseline = nn_baseline
        self.nn_baseline_input = nn_baseline_input
        # this run's latent values: for "stl"/"dreg" the draws (path-derivative checks); for a per-site estimator,
        # under Pyro's validation, the leaf tensors returned in place of its detached draws (latent-input checks)
        self._latent_values: dict[str, torch.Tensor] = {}

    def straight_through_at(self, site: str) -> bool | None:
        """At the log-space categorical latent ``site`` of the model (``role="model"``): ``True`` for the
        straight-through estimator, ``False`` for the plain relaxed one, ``None`` when this handler does not
        decide there (another role or site, or an estimator that is neither). Read by
        :func:`pyro_vae.distributions.relaxed.straight_through_override`."""
        if self.role != "model" or (self.sites is not None and site not in self.sites):
            return None
        mode = self.estimator.categorical
        return None if mode not in ("relaxed", "straight-through") else mode == "straight-through"

    def _applies(self, msg: dict) -> bool:
        if msg["type"] != "sample" or msg["is_observed"] or type(msg["fn"]).__name__ == "_Subsample":
            return False
        return self.sites is None or msg["name"] in self.sites

    def _pyro_sample(self, msg: dict) -> None:
        if self.role == "guide" and self.estimator.site_gradient is not None and self._latent_values and \
                not msg["is_observed"] and is_validation_enabled():
            self._record_latent_inputs(msg)
        if not self._applies(msg):
            return
        est = self.estimator
        mode = "exact" if est.score_function else est.categorical
        base = unwrap_independent(msg["fn"])[0]
        if not est.gaussian and not _is_relaxed_categorical(base) and not is_relaxed_bernoulli(base):
            raise ConfigError(message(
                f'estimator "{est.name}" at site "{msg["name"]}"', "a relaxed one-hot categorical latent",
                type(unwrap_independent(msg["fn"])[0]).__name__,
                'use "pathwise" or a "score-function" estimator, or build the VAE with latent="categorical"'))
        fn = _convert_categorical(msg["fn"], mode, self.role, msg["name"])
        if self.role == "guide" and est.name == "pathwise" and not fn.has_rsample and \
                not isinstance(fn, ScoreFunction):
            raise ConfigError(message(
                f'estimator "pathwise" at site "{msg["name"]}"',
                "a reparameterizable latent (a distribution with rsample: Gaussian, relaxed categorical, relaxed "
                "Bernoulli)", f"{type(base).__name__}, which has no rsample (an exact discrete latent)",
                'pass estimator="score-function", "rloo", "arm", "disarm", "nvil" or "enumerate" for it (fit\'s '
                "default estimator=None picks \"score-function\"), or build the VAE with relaxed=True (--relaxed)"))
        if self.role == "guide" and est.site_gradient is not None and not isinstance(fn, SiteGradient):
            fn = SiteGradient(fn)
        if self.role == "guide" and est.score_function:
            if not isinstance(fn, ScoreFunction):
                fn = ScoreFunction(fn)
            if est.baseline == "decaying":
                msg["infer"]["baseline"] = {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
            elif est.baseline == "neural":
                if self.nn_baseline is None or self.nn_baseline_input is None:
                    raise ConfigError(message(f'baseline at site "{msg["name"]}"', "nn_baseline and its input",
                                              "none", "use make_estimator_elbo(..., data_shape=...)"))
                msg["infer"]["baseline"] = {"nn_baseline": self.nn_baseline,
                                            "nn_baseline_input": self.nn_baseline_input}
        if self.role == "guide" and est.path_derivative:
            fn = self._path_gradient(fn, msg["name"])
        msg["fn"] = fn

    def _path_gradient(self, fn: Any, site: str) -> PathGradient:
        """``fn`` wrapped for ``"stl"``/``"dreg"``; under Pyro's validation, refused when its parameters
        depend on an earlier latent site of this run (:func:`~pyro_vae.infer.path_gradient.
        check_independent_parameters`)."""
        if isinstance(fn, PathGradient):
            return fn
        if is_validation_enabled():
            check_independent_parameters(fn, site, self._latent_values)
        return PathGradient(fn, site)

    def _record_latent_inputs(self, msg: dict) -> None:
        """Add to ``msg["infer"][LATENT_INPUTS]`` the earlier :class:`SiteGradient` sites of this run from whose
        values the site's distribution is computed."""
        inputs = latent_inputs(msg["fn"], self._latent_values)
        if inputs:
            known = tuple(msg["infer"].get(LATENT_INPUTS, ()))
            msg["infer"][LATENT_INPUTS] = known + tuple(n for n in inputs if n not in known)

    def _pyro_post_sample(self, msg: dict) -> None:
        if self.role == "guide" and self.estimator.path_derivative and self._applies(msg):
            self._latent_values[msg["name"]] = msg["value"]
        if self.role == "guide" and self.estimator.fixed_sites and isinstance(msg["fn"], SiteGradient) and \
                self._applies(msg) and is_validation_enabled() and torch.is_floating_point(msg["value"]) and \
                torch.is_grad_enabled():
            # The guide goes on with a leaf that requires grad in place of the detached draw (the trace, recorded
            # by an outer handler, keeps the draw): a later site whose distribution is computed from it shows
            # the dependency in the autograd graph. The parameters' gradients are unchanged.
            probe = msg["value"].detach().requires_grad_(True)
            msg["value"] = probe
            self._latent_values[msg["name"]] = probe
        # Pyro keeps one decaying average per data position; when the batch size changes (the last
        # minibatch), restart it from its mean so shapes agree.
        if self.role != "guide" or self.estimator.baseline != "decaying" or not self._applies(msg):
            return
        store = pyro.get_param_store()
        key = BASELINE_PARAM + msg["name"]
        if key in store:
            old = store[key].detach()
            shape = msg["fn"].batch_shape
            if old.shape != shape:
                store[key] = old.mean().expand(shape).clone()


def score_function(fn: Callable | None = None, sites: Iterable[str] | None = None,
                   baseline: str | None = None, baseline_beta: float = 0.9):
    """Force the score-function estimator on the latent sites of a guide (a handler in ``poutine`` style).

    Example::

        loss = Trace_ELBO().differentiable_loss(model, score_function(guide), x)
        loss = TraceGraph_ELBO().loss_and_grads(model, score_function(guide, baseline="decaying"), x)

    Args:
        fn: the guide; without it, returns the handler for use as a context manager.
        sites: names of the sites to change (default: every non-observed sample site).
        baseline: ``None`` or ``"decaying"`` (read by ``TraceGraph_ELBO``).
        baseline_beta: decay of the average baseline.
    """
    name = {None: "score-function", "decaying": "score-function-baseline"}.get(baseline)
    if name is None:
        raise ConfigError(message("baseline", 'None or "decaying"', repr(baseline),
                                  'pass baseline="decaying" (neural baselines: make_estimator_elbo)'))
    msngr = EstimatorMessenger(name, "guide", sites=sites, baseline_beta=baseline_beta)
    return msngr(fn) if fn is not None else msngr


class NeuralBaseline(nn.Module):
    """Input-dependent baseline ``b(x)`` for REINFORCE (Mnih & Gregor 2014): an MLP from
    ``(..., *data_shape)`` to ``(...)``, trained by ``TraceGraph_ELBO`` to regress the downstream cost."""

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.mlp = MLP((math.prod(self.data_shape), *[int(h) for h in hidden], 1), activation=nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.data_shape)]
        return self.mlp(x.reshape(*batch, -1)).squeeze(-1)


class _EstimatorELBOMixin(ParticleHandlerMixin):
    """Applies :class:`EstimatorMessenger` to the model and guide of every particle (sequential or
    vectorized) of Pyro's ELBOs (:class:`pyro_vae.pyro_internals.ParticleHandlerMixin`)."""

    # set by the Pyro ELBO the mixin is listed before
    num_particles: int
    vectorize_particles: bool

    def __init__(self, *args: Any, estimator: str | Estimator = "pathwise", baseline_beta: float = 0.9,
                 nn_baseline: nn.Module | None = None, sites: Iterable[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.estimator = get_estimator(estimator)
        self.baseline_beta = baseline_beta
        self.nn_baseline = nn_baseline
        self.sites = sites

    def extra_modules(self) -> list[nn.Module]:
        """Modules the estimator trains besides the VAE (the neural baseline); an optimizer must hold them."""
        return [self.nn_baseline] if self.nn_baseline is not None else []

    def _baseline_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if self.nn_baseline is None:
            return None
        x = args[0] if args else kwargs.get("x")
        if x is not None and self.vectorize_particles and self.num_particles > 1:
            x = x.expand(self.num_particles, *x.shape)
        return x

    def handle_particle(self, model: Callable, guide: Callable, args: tuple,
                        kwargs: dict) -> tuple[Callable, Callable]:
        """The model and the guide under :class:`EstimatorMessenger` for this ELBO's estimator."""
        model = EstimatorMessenger(self.estimator, "model", sites=self.sites)(model)
        guide = EstimatorMessenger(self.estimator, "guide", sites=self.sites, baseline_beta=self.baseline_beta,
                                   nn_baseline=self.nn_baseline,
                                   nn_baseline_input=self._baseline_input(args, kwargs))(guide)
        return model, guide


class EstimatorTrace_ELBO(_EstimatorELBOMixin, Trace_ELBO):
    """``Trace_ELBO`` whose model and guide run under :class:`EstimatorMessenger` (``estimator=...``)."""


class EstimatorTraceMeanField_ELBO(_EstimatorELBOMixin, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (analytic KL) for the pathwise-type estimators."""


class EstimatorTraceGraph_ELBO(_EstimatorELBOMixin, TraceGraph_ELBO):
    """``TraceGraph_ELBO`` (Rao-Blackwellized score-function terms, baselines) under
    :class:`EstimatorMessenger`."""
