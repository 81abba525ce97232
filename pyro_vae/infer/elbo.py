"""The ELBO factory and the ELBO of a data set.

:func:`make_elbo` is the one place an objective is built: from its name (``"trace"``: ``Trace_ELBO``;
``"meanfield"``: ``TraceMeanField_ELBO``; ``"iwae"``: the importance-weighted bound of
:mod:`pyro_vae.infer.iwae`, not an ELBO), its particles and its gradient estimator (the ELBO classes of
:mod:`pyro_vae.infer.estimators`); :func:`make_estimator_elbo` is the same factory with the estimator first.
:func:`evaluate_elbo` averages Pyro's ELBO over a data set, in nats per data point. :func:`is_elbo` decides
whether an ELBO object's value is the ELBO (its class is one of :data:`ELBO_CLASSES`) or another objective, such
as a bound on ``log p(x)``; :func:`reporting_elbo` and :func:`evaluate_elbo` go by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.estimators import (
    ESTIMATORS,
    Estimator,
    EstimatorTrace_ELBO,
    EstimatorTraceGraph_ELBO,
    EstimatorTraceMeanField_ELBO,
    NeuralBaseline,
    SiteGradient,
    get_estimator,
)
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.pair import ModelGuidePair, as_data_rows, as_pair, pair_structure, plate_clash_explained
from pyro_vae.infer.site_gradients import SiteGradientTrace_ELBO, SiteGradientTraceMeanField_ELBO, site_gradient_rule
from pyro_vae.models.context import check_context, context_rows, declared_shapes
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.validation import integer

__all__ = ["ELBOS", "BOUNDS", "ELBO_CLASSES", "make_elbo", "make_estimator_elbo", "check_elbo", "check_num_particles",
           "evaluate_elbo", "is_elbo", "reporting_elbo"]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
#: Training objectives that are not the ELBO: ``"iwae"``, the importance-weighted bound (Burda et al. 2016)
#: with ``num_particles`` importance samples per data point.
BOUNDS = {"iwae": ImportanceWeightedELBO}
#: The ELBO classes whose value (``loss``) is the negative ELBO, ``-(E_q[log p(x, z)] - E_q[log q(z|x)])``
#: estimated from ``num_particles`` draws (in closed form where ``TraceMeanField_ELBO`` has a registered KL and
#: ``TraceEnum_ELBO`` sums an enumerated site): Pyro's ``Trace_ELBO``, ``TraceMeanField_ELBO``,
#: ``TraceGraph_ELBO``, ``TraceEnum_ELBO`` and their ``Jit`` variants, and this library's estimator classes
#: (:mod:`pyro_vae.infer.estimators`, :mod:`pyro_vae.infer.site_gradients`), which change gradients only. The
#: class must match exactly: a subclass may change the value, and Pyro's ``RenyiELBO`` (a bound of order
#: ``alpha != 1``, Li & Turner 2016; Pyro refuses ``alpha = 1``), ``TraceTailAdaptive_ELBO`` (a surrogate of the
#: inclusive KL), ``TraceTMC_ELBO`` and :class:`~pyro_vae.infer.iwae.ImportanceWeightedELBO` (any ``K``) are not
#: the ELBO.
ELBO_CLASSES: tuple[type, ...] = (
    Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, TraceEnum_ELBO,
    JitTrace_ELBO, JitTraceMeanField_ELBO, JitTraceGraph_ELBO, JitTraceEnum_ELBO,
    EstimatorTrace_ELBO, EstimatorTraceMeanField_ELBO, EstimatorTraceGraph_ELBO,
    SiteGradientTrace_ELBO, SiteGradientTraceMeanField_ELBO,
)


def is_elbo(loss_fn: Any) -> bool:
    """Whether the value of the ELBO object ``loss_fn`` is the ELBO: its class is one of :data:`ELBO_CLASSES`
    (exactly, not a subclass). ``False`` for a bound (the importance-weighted bound, Pyro's ``RenyiELBO``), any
    other objective, and any class not listed, whose value is not known to be the ELBO."""
    return type(loss_fn) in ELBO_CLASSES


def _not_elbo_text(elbo: Any) -> str:
    """What :func:`evaluate_elbo`'s refusal says it found: ``elbo`` named, and why its value is not the ELBO."""
    if isinstance(elbo, str):
        return f"{elbo!r}, the importance-weighted bound"
    name = type(elbo).__name__
    if isinstance(elbo, ImportanceWeightedELBO):
        return f"{name}(num_particles={elbo.num_particles}), the importance-weighted bound"
    if isinstance(elbo, RenyiELBO):
        return (f"{name}(alpha={elbo.alpha}, num_particles={elbo.num_particles}), Renyi's bound (Li & Turner 2016; "
                "alpha=0 is the importance-weighted bound)")
    return f"{name}, a class whose value is not known to be the ELBO (not one of pyro_vae.infer.elbo.ELBO_CLASSES)"


def check_num_particles(elbo: Any, num_particles: Any) -> int:
    """The particles of the objective ``elbo`` (a name or an ELBO object) for ``num_particles`` (``None``: not
    given): an ELBO object's own ``num_particles``; ``K`` for ``"iwae"``; 1 for ``"trace"`` and ``"meanfield"``
    when not given.

    Raises:
        ConfigError: ``num_particles`` not ``None`` or an integer >= 1; ``"iwae"`` without ``num_particles``
            (the bound needs ``K``; ``K = 1`` is the ELBO); an ELBO object with a ``num_particles`` other than
            its own (set it on the object, or pass the objective's name).
    """
    if num_particles is not None:
        num_particles = integer("num_particles", num_particles, 1)
    if isinstance(elbo, ELBO):
        own = int(elbo.num_particles)
        if num_particles is not None and num_particles != own:
            names = {ImportanceWeightedELBO: "iwae", TraceMeanField_ELBO: "meanfield", Trace_ELBO: "trace"}
            name = next((n for cls, n in names.items() if isinstance(elbo, cls)), None)
            by_name = "" if name is None else (f', or pass the objective\'s name (elbo="{name}", '
                                               f"num_particles={num_particles})")
            raise ConfigError(message(
                "num_particles", f"the ELBO object's own num_particles ({own}) or None (the object sets its "
                f"particles)", f"{num_particles} with a {type(elbo).__name__}(num_particles={own})",
                f"set num_particles on the ELBO object ({type(elbo).__name__}(num_particles={num_particles}, ...))"
                + by_name))
        return own
    if num_particles is None:
        if isinstance(elbo, str) and elbo in BOUNDS:
            raise ConfigError(message(
                f'num_particles with elbo="{elbo}"', "K, the importance samples per data point", "None",
                "the IWAE bound needs K importance samples: pass num_particles=K (e.g. 50, as pyro-vae train "
                "--objective iwae uses); K=1 is the ELBO"))
        return 1
    return num_particles


def check_elbo(elbo: Any, estimator: str | Estimator = "pathwise") -> Estimator:
    """The :class:`~pyro_vae.infer.estimators.Estimator` of ``estimator`` when it can go with the objective
    named ``elbo`` (a key of :data:`ELBOS` or :data:`BOUNDS`).

    Raises:
        ConfigError: an unknown estimator or objective name; ``"meanfield"`` with a score-function estimator
            (Pyro's ``TraceMeanField_ELBO`` drops the score-function term of the reconstruction); an estimator
            of another objective (``"dreg"`` estimates the IWAE bound's gradient, ``"stl"`` and the score-function
            estimators the ELBO's).
    """
    est = get_estimator(estimator)
    if not isinstance(elbo, str) or (elbo not in ELBOS and elbo not in BOUNDS):
        raise ConfigError(message("elbo", " or ".join(f'"{name}"' for name in (*ELBOS, *BOUNDS)), repr(elbo),
                                  'pass elbo="trace"'))
    objective = "iwae" if elbo in BOUNDS else "elbo"
    if objective not in est.objectives:
        fix = ('pass elbo="iwae" with num_particles=K importance samples, or estimator="stl" for the ELBO '
               '("rloo", "arm" or "disarm" at a latent without rsample)'
               if objective == "elbo" else
               'pass estimator="dreg" or "pathwise" for the IWAE bound ("vimco" at a latent without rsample), or '
               'elbo="trace" for this estimator')
        raise ConfigError(message(f'elbo "{elbo}" with estimator "{est.name}"',
                                  "an estimator of the " + ("IWAE bound" if objective == "iwae" else "ELBO"),
                                  f'"{est.name}", an estimator of the ' + " and ".join(
                                      "IWAE bound" if o == "iwae" else "ELBO" for o in est.objectives), fix))
    if elbo == "meanfield" and est.score_function:
        raise ConfigError(message(
            f'elbo with estimator "{est.name}"', '"trace" (Monte Carlo KL)', '"meanfield"',
            "TraceMeanField_ELBO drops the score-function term of the reconstruction; use elbo=\"trace\""))
    return est


def make_elbo(elbo: str | ELBO = "trace", num_particles: int | None = None,
              estimator: str | Estimator = "pathwise", data_shape: Sequence[int] | None = None, *,
              baseline_beta: float = 0.9, nn_baseline: nn.Module | None = None,
              max_plate_nesting: int = 1, alpha: float = 0.0) -> ELBO:
    """The Pyro ELBO that computes ``estimator``'s gradient of the ELBO on an unchanged model/guide pair.

    The pathwise estimator changes no site, so it gets Pyro's own loss: ``Trace_ELBO`` (Monte Carlo KL) for
    ``"trace"``, ``TraceMeanField_ELBO`` (analytic KL where one is registered) for ``"meanfield"``, as their
    subclasses ``EstimatorTrace_ELBO`` / ``EstimatorTraceMeanField_ELBO``, which refuse a guide site without
    ``rsample`` (an exact Bernoulli or categorical latent, which Pyro would score with the score function:
    pass ``estimator="score-function"`` or a per-site estimator for it). Any other estimator gets the class of
    :mod:`pyro_vae.infer.estimators` that applies it: ``EstimatorTraceGraph_ELBO`` (Pyro's ``TraceGraph_ELBO``)
    for the baseline estimators, else ``EstimatorTrace_ELBO`` or ``EstimatorTraceMeanField_ELBO``. The particles
    are vectorized. An ELBO object is returned as is (with its own particles).

    ``"iwae"`` gives :class:`~pyro_vae.infer.iwae.ImportanceWeightedELBO`: the importance-weighted bound
    (Burda et al. 2016) with ``num_particles`` = ``K`` importance samples per data point (Renyi's bound of order
    ``alpha``; ``alpha=0`` is the IWAE bound), for ``"pathwise"`` (the bound's own gradient) or ``"dreg"``
    (Tucker et al. 2019).

    Args:
        elbo: ``"trace"``, ``"meanfield"``, ``"iwae"`` or a ``pyro.infer.ELBO`` object (pathwise estimator
            only).
        num_particles: particles per estimate, an integer >= 1 (``"iwae"``: the importance samples ``K``, which
            must be given); ``None`` (the default): 1 for ``"trace"`` and ``"meanfield"``, the object's own for
            an ELBO object (:func:`check_num_particles`).
        estimator: a name of :data:`~pyro_vae.infer.estimators.ESTIMATORS` or an ``Estimator``.
        data_shape: shape of one data point; sizes the neural baseline of ``"score-function-neural-baseline"``.
        baseline_beta: decay of the average baseline of ``"score-function-baseline"``.
        nn_baseline: your own baseline module for ``"score-function-neural-baseline"`` (default: a
            :class:`~pyro_vae.infer.estimators.NeuralBaseline` for ``data_shape``), or the learned module of a
            per-site estimator that has one (``"muprop"``, ``"nvil"``, ...; default: built for ``data_shape``).
        max_plate_nesting: plates in the model (1 for a :class:`pyro_vae.VAE`).
        alpha: ``"iwae"`` only: the order of Renyi's bound, ``0 <= alpha < 1``.

    Raises:
        ConfigError: as :func:`check_elbo`; as :func:`check_num_particles` (``num_particles`` not an integer
            >= 1, ``"iwae"`` without it, an ELBO object with another); an ELBO object with an
            estimator other than pathwise; the neural baseline without ``data_shape`` or ``nn_baseline``; when
            the ELBO runs, ``"pathwise"`` at a guide site without ``rsample``
            (:class:`~pyro_vae.infer.estimators.EstimatorMessenger`).
    """
    if isinstance(elbo, ELBO):
        if get_estimator(estimator) != ESTIMATORS["pathwise"]:
            raise ConfigError(message("estimator", '"pathwise" when elbo is an ELBO object', repr(estimator),
                                      'pass elbo="trace" with the estimator name'))
        check_num_particles(elbo, num_particles)
        return elbo
    num_particles = check_num_particles(elbo, num_particles)
    est = check_elbo(elbo, estimator)
    if elbo in BOUNDS:
        return BOUNDS[elbo](num_particles, alpha=alpha, estimator=est, max_plate_nesting=max_plate_nesting)
    if alpha != 0.0:
        raise ConfigError(message("alpha", '0 unless elbo="iwae" (the order of its bound)', repr(alpha),
                                  'drop alpha, or pass elbo="iwae"'))
    kwargs: dict[str, Any] = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                  max_plate_nesting=max_plate_nesting)
    if est == ESTIMATORS["pathwise"]:  # Pyro's class, whose guide sites are checked to have rsample
        return (EstimatorTraceMeanField_ELBO if elbo == "meanfield" else EstimatorTrace_ELBO)(estimator=est, **kwargs)
    if est.baseline == "neural" and nn_baseline is None:
        if data_shape is None:
            raise ConfigError(message("data_shape", "the shape of one data point for the neural baseline", "None",
                                      "pass data_shape=vae.data_shape or nn_baseline=module"))
        nn_baseline = NeuralBaseline(data_shape)
    kwargs.update(estimator=est, baseline_beta=baseline_beta,
                  nn_baseline=nn_baseline if est.baseline == "neural" else None)
    if est.site_gradient is not None:
        return _site_gradient_elbo(elbo, est, kwargs, data_shape, nn_baseline)
    if est.baseline is not None:
        return EstimatorTraceGraph_ELBO(**kwargs)
    if elbo == "meanfield":
        return EstimatorTraceMeanField_ELBO(**kwargs)
    return EstimatorTrace_ELBO(**kwargs)


def _site_gradient_elbo(elbo: str, est: Estimator, kwargs: dict[str, Any], data_shape: Sequence[int] | None,
                        module: nn.Module | None) -> ELBO:
    """The ELBO of a per-site estimator (:mod:`pyro_vae.infer.site_gradients`), with the particles its rule needs
    (``rloo``: ``K >= 2``) and its learned module (``module``, or built for ``data_shape``)."""
    rule = site_gradient_rule(est)
    if kwargs["num_particles"] < rule.min_particles:
        raise ConfigError(message(f'num_particles with estimator "{est.name}"',
                                  rule.particles_reason or f"K >= {rule.min_particles} draws",
                                  str(kwargs["num_particles"]), f"pass num_particles=K with K >= {rule.min_particles}"))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("baseline_beta", "nn_baseline")}
    if rule.module is not None and module is None:
        if data_shape is None:
            raise ConfigError(message("data_shape", f'the shape of one data point for the learned part of estimator '
                                      f'"{est.name}"', "None", "pass data_shape=vae.data_shape or nn_baseline=module"))
        module = rule.module(data_shape)
    cls = SiteGradientTraceMeanField_ELBO if elbo == "meanfield" else SiteGradientTrace_ELBO
    return cls(site_module=module if rule.module is not None else None, **kwargs)


def make_estimator_elbo(estimator: str | Estimator = "pathwise", elbo: str | ELBO = "trace",
                        num_particles: int | None = None, *, data_shape: Sequence[int] | None = None,
                        baseline_beta: float = 0.9, nn_baseline: nn.Module | None = None,
                        max_plate_nesting: int = 1, alpha: float = 0.0) -> ELBO:
    """An alias of :func:`make_elbo` with the estimator as first argument: ``make_estimator_elbo(estimator,
    elbo, num_particles, ...)`` is ``make_elbo(elbo, num_particles, estimator, ...)``, same ELBO, same errors."""
    return make_elbo(elbo, num_particles, estimator, data_shape, baseline_beta=baseline_beta,
                     nn_baseline=nn_baseline, max_plate_nesting=max_plate_nesting, alpha=alpha)


def reporting_elbo(loss_fn: ELBO) -> ELBO:
    """The ELBO that reports the ELBO proper for a training objective ``loss_fn``: ``loss_fn`` itself when its
    value is the ELBO (:func:`is_elbo`), else a one-particle ``Trace_ELBO`` (Monte Carlo KL): for the
    importance-weighted bound (:class:`~pyro_vae.infer.iwae.ImportanceWeightedELBO`, any ``K``), Pyro's
    ``RenyiELBO``, and any other class, whose value is not (or not known to be) the ELBO. Its plate nesting is
    ``loss_fn``'s (the importance-weighted bound's particle plate not counted)."""
    if is_elbo(loss_fn):
        return loss_fn
    nesting = loss_fn.max_plate_nesting
    if isinstance(loss_fn, ImportanceWeightedELBO) and nesting != float("inf"):
        nesting = max(int(nesting) - 1, 1)
    return Trace_ELBO(max_plate_nesting=nesting)


def evaluate_elbo(vae: VAE | ModelGuidePair | Any, data: Any, *, elbo: str | ELBO = "trace",
                  num_particles: int | None = None, batch_size: int = 1024,
                  context: Mapping[str, Any] | None = None) -> float:
    """Mean ELBO per data point (nats) of ``data`` (``(N, *data_shape)``, any real dtype) under ``elbo``,
    without gradients, in batches of ``batch_size`` (an integer >= 1; :class:`ConfigError` otherwise).

    The ELBO proper, ``E_q[log p(x|z)] - KL(q(z|x) || p(z))``, whatever the VAE's KL weight ``beta`` (the
    beta-weighted training objective is ``History``'s ``train_objective``).

    ``vae`` may be any model/guide pair (:class:`pyro_vae.ModelGuidePair`, :mod:`pyro_vae.infer.pair`; ``data``
    is then ``(N, ...)``): the result is the ELBO of the whole data set divided by ``N``, the global latents'
    KL counted once. Each batch of ``b`` points is scored with ``num_data=N`` (its local sites scaled by ``N / b``,
    the global ones not), which estimates the data set's ELBO; the estimates are averaged with weights ``b / N``.
    For a VAE alone this is the mean of the per-batch ELBOs, as above. A VAE among the pair's ``modules`` is
    evaluated with KL weight 1.

    ``context``: the data's named context, ``{name: value}``, passed to the model and guide as keyword arguments
    (``vae.model(xb, **context)``): a tensor whose first dimension is ``N`` is per data point, and each batch gets
    its rows (``context["y"][i:i + b]`` with ``data[i:i + b]``); every other value is passed whole
    (:func:`pyro_vae.models.context.check_context`: a value of a name the encoder or decoder takes per data point
    whose first dimension is not ``N`` is a :class:`~pyro_vae.errors.DataError`; a name they take that is missing
    is the VAE's :class:`ConfigError`).

    ``num_particles``: particles per batch's estimate, an integer >= 1; ``None`` (the default): 1 for a name, the
    object's own for an ELBO object (another value is a :class:`ConfigError`, :func:`check_num_particles`).

    ``elbo="iwae"`` is refused, and so is an ELBO object whose value is not the ELBO (:func:`is_elbo`: an
    :class:`~pyro_vae.infer.iwae.ImportanceWeightedELBO` of any ``K``, Pyro's ``RenyiELBO``, or a class not in
    :data:`ELBO_CLASSES`, a subclass included): the importance-weighted bound is not the ELBO;
    :func:`pyro_vae.log_likelihood` estimates it, with its standard error."""
    if (isinstance(elbo, str) and elbo in BOUNDS) or (isinstance(elbo, ELBO) and not is_elbo(elbo)):
        raise ConfigError(message("elbo", '"trace", "meanfield" or an ELBO object whose value is the ELBO (one of '
                                  "pyro_vae.infer.elbo.ELBO_CLASSES; this function reports the ELBO)",
                                  _not_elbo_text(elbo),
                                  'pass elbo="trace" (or a Trace_ELBO object with the particles you want), or use '
                                  "pyro_vae.log_likelihood(vae, data, K) for the importance-weighted bound"))
    vae = as_pair(vae)
    if isinstance(vae, ModelGuidePair):
        return _pair_elbo(vae, data, elbo, num_particles, batch_size, context)
    x = vae.as_data(as_tensor_data(data, "data"), "data", data_set=True)
    batch_size = integer("batch_size", batch_size, 1)
    loss_fn = _value_elbo(elbo, num_particles)
    device = vae.device
    n = x.shape[0]
    ctx = check_context("context", context, n, declared_shapes(vae), device)
    total = 0.0
    guide = _value_only_guide(vae.guide, loss_fn)
    with torch.no_grad(), unit_kl_weight(vae):
        for i in range(0, n, batch_size):
            xb = x[i: i + batch_size].to(device)
            rows = context_rows(ctx, n, slice(i, i + batch_size))
            # every Pyro ELBO defines loss; the ELBO base class does not declare it
            total += loss_fn.loss(vae.model, guide, xb, **rows)  # type: ignore[attr-defined]
    return -total / n


def _value_elbo(elbo: str | ELBO, num_particles: int | None, max_plate_nesting: int = 1) -> ELBO:
    """Pyro's own ELBO of ``elbo`` for values only (:func:`evaluate_elbo`): checked as :func:`make_elbo` checks it,
    without the pathwise estimator's refusal of a guide site without ``rsample`` (which concerns gradients)."""
    loss_fn = make_elbo(elbo, num_particles, max_plate_nesting=max_plate_nesting)
    if isinstance(elbo, str) and isinstance(loss_fn, (EstimatorTrace_ELBO, EstimatorTraceMeanField_ELBO)):
        return ELBOS[elbo](num_particles=loss_fn.num_particles, vectorize_particles=loss_fn.vectorize_particles,
                           max_plate_nesting=max_plate_nesting)
    return loss_fn


class _ValueOnly(Messenger):
    """Scores every latent guide site that has no ``rsample`` through
    :class:`~pyro_vae.infer.estimators.SiteGradient` (same draws, same densities, same registered KL), which
    ``TraceMeanField_ELBO`` accepts: its check that the guide is reparameterized concerns gradients only."""

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or type(fn).__name__ == "_Subsample" or getattr(fn, "has_rsample", True):
            return
        msg["fn"] = SiteGradient(fn)


def _value_only_guide(guide: Any, loss_fn: Any) -> Any:
    """``guide`` as ``loss_fn`` can score it for the ELBO's value (no gradients): under a
    ``TraceMeanField_ELBO``, its latent sites without ``rsample`` (an exact Bernoulli or categorical latent) are
    scored with their registered KL (or Monte Carlo where none is), as their ELBO value is defined, instead of
    Pyro's refusal of a guide that is not reparameterized; other ELBOs get ``guide`` unchanged."""
    return _ValueOnly()(guide) if isinstance(loss_fn, TraceMeanField_ELBO) else guide


def _pair_elbo(pair: ModelGuidePair, data: Any, elbo: str | ELBO, num_particles: int | None, batch_size: int,
               context: Mapping[str, Any] | None) -> float:
    """:func:`evaluate_elbo` of a model/guide pair: each batch scored with ``num_data=N``, weighted ``b / N``."""
    x = as_data_rows(pair, data, "data")
    batch_size = integer("batch_size", batch_size, 1)
    n = x.shape[0]
    device = next((t.device for t in (*pair.parameters(), *pair.buffers())), x.device)
    ctx = check_context("context", context, n, declared_shapes(pair), device)
    structure = pair_structure(pair, x[:batch_size].to(device), n, context=context_rows(ctx, n, slice(0, batch_size)))
    loss_fn = _value_elbo(elbo, num_particles, structure.max_plate_nesting)
    total = 0.0
    was_training = pair.training
    pair.eval()
    try:
        with torch.no_grad(), unit_kl_weight(pair), plate_clash_explained():
            for i in range(0, n, batch_size):
                xb = x[i: i + batch_size].to(device)
                rows = context_rows(ctx, n, slice(i, i + batch_size))
                guide = _value_only_guide(pair.guide, loss_fn)
                # every Pyro ELBO defines loss; the ELBO base class does not declare it
                loss = loss_fn.loss(pair.model, guide, xb, num_data=n, **rows)  # type: ignore[attr-defined]
                total += loss * xb.shape[0] / n
    finally:
        pair.train(was_training)
    return -total / n
