"""REBAR (Tucker et al. 2017) and RELAX (Grathwohl et al. 2018) for Bernoulli guide sites.

For a Bernoulli site ``b ~ Bern(sigmoid(theta))`` (``theta`` the guide's logits, one per coordinate) and its cost
``f(b)`` (the ELBO's, ``log p(x, z) - log q(z)`` per plate entry: :func:`pyro_vae.infer.site_gradients.site_cost`),
both estimators add a control variate built on the continuous relaxation ``z = theta + L`` (``L`` standard
logistic noise, ``b = H(z)`` the step function) and the conditional relaxation ``z~ ~ p(z | b)``:

    G = [f(b) - c(z~)] d log q(b) / d theta + d c(z) / d theta - d c(z~) / d theta

``z`` is drawn given the site's own draw ``b`` (the pair ``(b, z)`` then has the joint law of ``(H(z), z)``) and
differentiated as ``theta + L`` (``dz/dtheta = 1``); ``z~`` is a second, independent draw given ``b``,
``z~ = b softplus(l + softplus(theta)) - (1 - b) softplus(l + softplus(-theta))`` with ``l`` the logit of a
uniform, and differentiated through its dependence on ``theta`` (the term duvenaud/relax#6 restored). ``G`` is
unbiased for any differentiable ``c`` (Grathwohl et al. 2018, appendix B):

- REBAR: ``c(z) = eta f(sigma_lambda(z))``, the cost at the Concrete relaxation ``sigma_lambda(z) =
  sigmoid(z / lambda)``, with a learned temperature ``lambda`` and scale ``eta`` (tensorflow/models
  research/rebar; initial values 0.5 and 1);
- RELAX: ``c(z) = eta f(sigma_lambda(z)) + r_rho(sigma_lambda(z))`` with a learned network ``r_rho``
  (:class:`CoordinateSurrogate` by default: one small MLP applied to each coordinate and summed over the site's
  event, sized independently of the site so that its parameters exist before the first step; its last layer
  starts at zero, so RELAX starts as REBAR).

The cost of a relaxed value is the model replayed at a value in ``(0, 1)``: the Bernoulli log-densities of the
prior, of the guide and of any Bernoulli site that reads the latent are then ``y log p + (1 - y) log(1 - p)``
(torch's ``Bernoulli.log_prob`` is that expression, linear in ``y`` and smooth), the relaxation REBAR evaluates;
Pyro's and torch's support checks, which would refuse such a value, are switched off for those evaluations only.

The parameters ``phi`` of the control variate (:class:`RebarControl`) are trained to minimize the estimator's
variance: as ``E G`` does not depend on ``phi``, ``d Var(G) / d phi = E d |G|^2 / d phi``, whose one-draw
estimate is taken with autograd (``create_graph`` through the two derivatives of ``c``); the site's term carries
``-phi . d|G|^2/dphi`` (detached), so that one backward pass of the ELBO's surrogate loss gives ``phi`` its
variance gradient and no other parameter gets any of it. ``|G|^2`` is summed over the site's coordinates and
plate entries (the variance of the gradient with respect to the logits). Costs: three evaluations of the model
per estimate and one double backward pass.

Categorical sites are refused: the categorical latent's exact log-density is piecewise constant in a relaxed
value (its arg-max), so its relaxed cost would not be a differentiable control variate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.site_context import SiteContext
from pyro_vae.networks import MLP

__all__ = ["RebarControl", "CoordinateSurrogate", "conditional_logistic", "rebar_gradient", "rebar_term",
           "rebar_control", "relax_control", "REBAR_EVALUATIONS"]

#: Model evaluations per estimate: ``f(b)``, ``c(z)`` and ``c(z~)`` (plus one double backward pass).
REBAR_EVALUATIONS = 3


def conditional_logistic(logits: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A draw of ``z = logits + L`` (``L`` standard logistic) given ``H(z) = b`` (``z >= 0`` for ``b = 1``, ``z < 0``
    for ``b = 0``), from uniforms ``u`` in (0, 1): ``softplus(l + softplus(logits))`` for ``b = 1`` and
    ``-softplus(l + softplus(-logits))`` for ``b = 0``, ``l = log u - log(1 - u)``; differentiable in ``logits``.
    All three broadcast; the result has their broadcast shape."""
    l_u = torch.log(u) - torch.log1p(-u)
    return torch.where(b > 0.5, F.softplus(l_u + F.softplus(logits)), -F.softplus(l_u + F.softplus(-logits)))


def _uniform(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(like.dtype).eps
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp(eps, 1.0 - eps)


class CoordinateSurrogate(nn.Module):
    """RELAX's learned part ``r_rho(y) = sum_i m_rho(y_i)``: one MLP ``m_rho`` from a coordinate of the relaxed
    value ``y`` (in (0, 1)) to a number, summed over the site's event coordinates.

    Args:
        hidden: the MLP's hidden widths (ReLU between layers, as Grathwohl et al. 2018 use).

    ``forward(y, event_dim)``: ``y`` ``(*batch_shape, *event_shape)`` to ``(*batch_shape)``. The last layer starts at
    zero (``r_rho = 0``: RELAX starts as REBAR).
    """

    def __init__(self, hidden: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        self.mlp = MLP((1, *[int(h) for h in hidden], 1), activation=nn.ReLU)
        last = self.mlp.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, y: torch.Tensor, event_dim: int) -> torch.Tensor:
        dtype = next(self.mlp.parameters()).dtype
        out = self.mlp(y.unsqueeze(-1).to(dtype)).squeeze(-1).to(y.dtype)
        return out.sum(tuple(range(-event_dim, 0))) if event_dim else out


class RebarControl(nn.Module):
    """The learned control variate of REBAR and RELAX: ``c(z) = eta cost(sigma_lambda(z)) [+ r_rho(sigma_lambda(z))]``.

    Args:
        temperature: initial temperature ``lambda`` of the relaxation ``sigmoid(z / lambda)`` (> 0; learned as its
            log).
        eta: initial scale of the relaxed cost.
        surrogate: RELAX's network ``r_rho`` (``forward(y, event_dim) -> (*batch_shape)``), ``None`` for REBAR.

    Attributes:
        log_temperature, eta: scalar parameters.
    """

    def __init__(self, temperature: float = 0.5, eta: float = 1.0, surrogate: nn.Module | None = None) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(message("temperature", "a finite number > 0", repr(temperature), "pass temperature=0.5"))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.eta = nn.Parameter(torch.tensor(float(eta)))
        self.surrogate = surrogate

    @property
    def temperature(self) -> torch.Tensor:
        """``lambda = exp(log_temperature)``, a scalar tensor."""
        return self.log_temperature.exp()

    def forward(self, cost: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, event_dim: int,
                units: float = 1.0) -> torch.Tensor:
        """``c(z)`` per plate entry, ``(*batch_shape)``, for the relaxation ``z`` ``(*batch_shape, *event_shape)``
        and the site's cost ``cost(value) -> (*batch_shape)``; the surrogate's output, in nats per data point, is
        multiplied by ``units``, the scale of ``cost`` (:attr:`SiteContext.cost_units
        <pyro_vae.infer.site_context.SiteContext.cost_units>`)."""
        y = torch.sigmoid(z / self.temperature.to(z.dtype))
        c = self.eta.to(z.dtype) * cost(y)
        if self.surrogate is not None:
            c = c + units * self.surrogate(y, event_dim)
        return c


def rebar_control(data_shape: Sequence[int] | None = None) -> RebarControl:
    """REBAR's control variate at its initial values (temperature 0.5, ``eta`` 1); ``data_shape`` is not used."""
    return RebarControl()


def relax_control(data_shape: Sequence[int] | None = None) -> RebarControl:
    """RELAX's control variate: REBAR's plus a :class:`CoordinateSurrogate`; ``data_shape`` is not used."""
    return RebarControl(surrogate=CoordinateSurrogate())


@contextlib.contextmanager
def _relaxed_values_allowed(fn: Any) -> Iterator[None]:
    """Pyro's and torch's validation off, and off on the distributions inside ``fn`` (their support check
    would refuse a value in (0, 1)), for the duration."""
    found = []
    stack = [fn]
    while stack:
        d = stack.pop()
        if isinstance(d, torch.distributions.Distribution):
            found.append((d, d.__dict__.get("_validate_args", None)))
            d._validate_args = False
        for attr in ("base", "base_dist"):
            inner = d.__dict__.get(attr)
            if inner is not None:
                stack.append(inner)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        for d, old in found:
            if old is None:
                d.__dict__.pop("_validate_args", None)
            else:
                d._validate_args = old


def rebar_gradient(cost: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor, logits: torch.Tensor,
                   control: RebarControl, event_dim: int, create_graph: bool = True,
                   units: float = 1.0) -> torch.Tensor:
    """One REBAR / RELAX estimate ``G`` (module docstring) of the gradient of ``E cost(b)`` with respect to the
    logits of a Bernoulli site, ``value``'s shape.

    Args:
        cost: ``cost(value) -> (*batch_shape)``, differentiable in the value, defined for values in [0, 1].
        value: the draw ``b`` in {0, 1}, ``(*batch_shape, *event_shape)``.
        logits: the site's logits, broadcastable to ``value`` (only their values are used).
        control: the control variate.
        event_dim: the site's event dimensions.
        create_graph: keep ``G``'s graph in ``control``'s parameters (for their variance gradient).
        units: the scale of ``cost`` per data point; RELAX's surrogate output is multiplied by it.
    """
    b = value.detach()
    theta = logits.detach().expand(b.shape)
    u, v = _uniform(b.shape, b), _uniform(b.shape, b)
    with torch.no_grad():
        noise = conditional_logistic(theta, b, u) - theta  # z given b, then reparameterized as theta + noise
        f_b = cost(b)

    def relaxed(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = control(cost, t + noise, event_dim, units)
        return c.sum(), c

    def conditional(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = control(cost, conditional_logistic(t, b, v), event_dim, units)
        return c.sum(), c

    # torch.func.grad: nested in gradient_samples' vmap, and differentiable in the control's parameters
    d_z, _ = grad(relaxed, has_aux=True)(theta)
    d_tilde, c_tilde = grad(conditional, has_aux=True)(theta)
    if not create_graph:
        d_z, d_tilde, c_tilde = d_z.detach(), d_tilde.detach(), c_tilde.detach()
    signal = (f_b - c_tilde).reshape(f_b.shape + (1,) * event_dim)
    score = b - torch.sigmoid(theta)
    return signal * score + d_z - d_tilde


def rebar_term(ctx: SiteContext) -> torch.Tensor:
    """The term REBAR / RELAX add to the surrogate ELBO at a Bernoulli site (``ctx.module`` the
    :class:`RebarControl`): ``G . theta`` (``G`` detached) for the guide's logits ``theta`` and, while training,
    ``-phi . d|G|^2/dphi`` (detached) for the control variate's parameters ``phi``.

    Raises:
        ConfigError: a site that is not Bernoulli, or no :class:`RebarControl`.
    """
    family = ctx.family
    if not isinstance(family, torch.distributions.Bernoulli):
        raise ctx.refuse("a Bernoulli guide distribution (to_event allowed)",
                         'use "rloo" or "score-function-mean-baseline", which apply to any family')
    control = ctx.module
    if not isinstance(control, RebarControl):
        raise ConfigError(message(f'estimator "{ctx.est.name}" at site "{ctx.name}"', "a RebarControl module",
                                  type(control).__name__, "pass nn_baseline=RebarControl(...) or leave it out"))
    if not torch.is_grad_enabled():
        return torch.zeros((), dtype=ctx.value.dtype, device=ctx.value.device)
    value = ctx.value
    logits = family.logits.expand(value.shape)
    params = [p for p in control.parameters() if p.requires_grad] if ctx.training else []
    relaxed_cost = getattr(ctx, "relaxed_cost", None)
    with _relaxed_values_allowed(ctx.site["fn"]):
        g = rebar_gradient(relaxed_cost or ctx.cost, value, logits, control, ctx.event_dim, create_graph=bool(params),
                           units=ctx.cost_units)
    term = (g.detach() * logits).sum()
    if params:
        grads = torch.autograd.grad(g.pow(2).sum(), params, allow_unused=True)
        term = term - sum(((p * d.detach()).sum() for p, d in zip(params, grads) if d is not None),
                          torch.zeros((), dtype=term.dtype, device=term.device))
    return term
