"""The path derivative of ``log q``: sticking the landing (STL) and the guide side of DReG.

A reparameterized guide site ``z = z(eps, phi)`` enters the ELBO's surrogate through ``log q_phi(z)``, whose
gradient has two parts: the path through ``z`` and the score term ``d/dphi log q_phi(z)`` at fixed ``z``,
whose expectation is zero. Sticking the landing (Roeder, Wu & Duvenaud 2017) drops the score term: it
evaluates ``log q`` at the reparameterized ``z`` under a copy of ``q`` with detached parameters. At the exact
posterior ``log p(x, z) - log q(z)`` is constant in ``z``, so the estimate has zero variance. The doubly
reparameterized gradient of the IWAE bound (Tucker, Lawson, Gu & Maddison 2019) uses the same detached
``log q`` for the encoder (:mod:`pyro_vae.infer.iwae`).

As Pyro lets the distribution decide the estimator (``Distribution.score_parts``), :class:`PathGradient` wraps
the guide site's distribution: it samples (``rsample``) and scores (``log_prob``) like the distribution, and
its ``score_parts`` give the detached-parameter log-density as the entropy term, the term Pyro's ``Trace_ELBO``
differentiates. The loss (the ELBO's value) is unchanged; only the gradient differs.

It is sound where ``q``'s parameters do not depend on other latent sites of the guide: detaching a site whose
parameters are computed from an earlier latent ``z1`` would also cut the path ``z1 -> q(z2 | z1)``, a pathwise
term, not a score term. :func:`check_independent_parameters` refuses that case (under Pyro's validation).
"""

from __future__ import annotations

from typing import Any, cast

import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence, register_kl
from pyro.distributions.score_parts import ScoreParts

from pyro_vae.distributions.wrapped import Wrapped
from pyro_vae.errors import ConfigError, message

__all__ = ["PathGradient", "detached", "distribution_parameters", "latent_inputs", "check_independent_parameters"]

_LOC_SCALE = (torch.distributions.Normal, torch.distributions.LogNormal, torch.distributions.Laplace,
              torch.distributions.Cauchy, torch.distributions.Gumbel)
_NO_SHAPE = torch.Size()
SUPPORTED = "Normal, LogNormal, Laplace, Cauchy, Gumbel, StudentT or MultivariateNormal (under .to_event)"


def _unsupported(fn: Any, site: str) -> ConfigError:
    return ConfigError(message(
        f'estimator "stl"/"dreg" at site "{site}"',
        f"a reparameterized guide distribution whose parameters can be detached: {SUPPORTED}",
        type(fn).__name__, 'use estimator="pathwise" for this guide'))


def distribution_parameters(fn: Any, site: str = "") -> list[torch.Tensor]:
    """The parameter tensors of a supported distribution (through ``Independent`` wrappers).

    Raises:
        ConfigError: a distribution that :func:`detached` does not know, naming ``site``."""
    if isinstance(fn, torch.distributions.Independent):
        return distribution_parameters(fn.base_dist, site)
    if isinstance(fn, _LOC_SCALE):
        return [fn.loc, fn.scale]
    if isinstance(fn, torch.distributions.StudentT):
        return [fn.df, fn.loc, fn.scale]
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return [fn.loc, fn.scale_tril]
    raise _unsupported(fn, site)


def detached(fn: Any, site: str = "") -> Any:
    """A copy of the distribution ``fn`` (same type, batch and event shape) whose parameters are detached
    from the autograd graph: its ``log_prob(z)`` is differentiable in ``z`` only.

    Raises:
        ConfigError: a distribution other than those of :data:`SUPPORTED`, naming ``site``."""
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(detached(fn.base_dist, site), fn.reinterpreted_batch_ndims)
    params = [p.detach() for p in distribution_parameters(fn, site)]
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return type(fn)(params[0], scale_tril=params[1], validate_args=False)
    return type(fn)(*params, validate_args=False)


class PathGradient(Wrapped):
    """A reparameterized distribution whose ``log q`` reaches Pyro's surrogate through its value only.

    ``rsample``, ``sample``, ``log_prob``, ``support``, ``mean``, ``variance`` and ``entropy`` are those of
    ``base``; ``score_parts(z)`` is ``(base.log_prob(z), 0, detached(base).log_prob(z))``, so ``Trace_ELBO``
    (and ``TraceMeanField_ELBO`` at a site without a closed-form KL) computes the sticking-the-landing
    gradient (Roeder et al. 2017). ``expand`` and ``to_event`` keep the wrapper; ``kl_divergence(PathGradient(q),
    p)`` is ``kl_divergence(q, p)`` (an analytic KL has no score term to drop).

    Args:
        base: a distribution of :data:`SUPPORTED` (``has_rsample``).
        site: the site's name, for error messages.

    Raises:
        ConfigError: ``base`` cannot be reparameterized or detached.
    """

    has_rsample = True

    def __init__(self, base: Any, site: str = "", validate_args: bool | None = None) -> None:
        if not getattr(base, "has_rsample", False):
            raise ConfigError(message(
                f'estimator "stl"/"dreg" at site "{site}"', "a reparameterized guide site (has_rsample)",
                f"{type(base).__name__} without rsample",
                'use a reparameterized guide distribution, or a "score-function" estimator'))
        distribution_parameters(base, site)
        self.site = site
        super().__init__(base)

    def rewrap(self, base: Any) -> PathGradient:
        """The wrapper around another ``base``, at the same site."""
        return PathGradient(base, self.site)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = _NO_SHAPE) -> torch.Tensor:
        return self.base.rsample(sample_shape)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = _NO_SHAPE) -> torch.Tensor:
        return self.base.sample(sample_shape)

    def score_parts(self, value: torch.Tensor) -> ScoreParts:
        return ScoreParts(log_prob=self.base.log_prob(value), score_function=cast(torch.Tensor, 0),
                          entropy_term=detached(self.base, self.site).log_prob(value))


@register_kl(PathGradient, torch.distributions.Distribution)
def _kl_path_gradient(p: PathGradient, q: Any) -> torch.Tensor:
    return kl_divergence(p.base, q)


def _parameter_tensors(obj: Any, seen: set[int]) -> list[torch.Tensor]:
    """The tensors a distribution (or a transform of a ``TransformedDistribution``) holds as attributes, through
    the distributions and transforms it holds (``Independent.base_dist``, a wrapper's ``base``, ``transforms``)."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    out: list[torch.Tensor] = []
    for v in vars(obj).values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if torch.is_tensor(item):
                out.append(item)
            elif isinstance(item, (torch.distributions.Distribution, torch.distributions.Transform)):
                out.extend(_parameter_tensors(item, seen))
    return out


def latent_inputs(fn: Any, earlier: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``earlier`` (``{latent site: value}``, values that require grad) from whose values the
    parameters of the distribution ``fn`` are computed: those its parameter tensors (the tensors it holds,
    through ``Independent``, wrappers and transforms) reach in the autograd graph. One ``torch.autograd.grad``
    call (graph kept); ``[]`` when no parameter requires grad (e.g. under ``torch.no_grad``).

    The shared test behind the refusals of estimators that are sound only when a guide site's distribution does not
    depend on another latent's value: :func:`check_independent_parameters` (``"stl"``, ``"dreg"``) and the per-site
    estimators of :mod:`pyro_vae.infer.site_gradients` (``check_fixed_sites`` there)."""
    params = [p for p in _parameter_tensors(fn, set()) if p.requires_grad]
    inputs = {n: v for n, v in earlier.items() if torch.is_tensor(v) and v.requires_grad}
    if not params or not inputs:
        return []
    grads = torch.autograd.grad([p.sum() for p in params], list(inputs.values()), allow_unused=True,
                                retain_graph=True)
    return [name for name, g in zip(inputs, grads, strict=True) if g is not None]


def check_independent_parameters(fn: Any, site: str, earlier: dict[str, torch.Tensor]) -> None:
    """Refuse a guide site whose distribution's parameters depend on the values ``earlier`` of other latent
    sites (``{name: value}``): detaching them would drop a pathwise term, not only the score term.

    Raises:
        ConfigError: naming ``site`` and the latent site it depends on."""
    distribution_parameters(fn, site)  # a family stl can detach (ConfigError otherwise)
    inputs = latent_inputs(fn, earlier)
    if inputs:
        raise ConfigError(message(
            f'estimator "stl"/"dreg" at site "{site}"',
            "a guide distribution whose parameters do not depend on other latent sites (the detached "
            "log q would drop a pathwise term)", f'parameters computed from the latent site "{inputs[0]}"',
            'use estimator="pathwise" for this guide'))
