"""Gradient estimators for discrete guide sites (Bernoulli, categorical): the per-site terms of exact
enumeration, ARM, DisARM, MuProp and NVIL.

Each ``*_term(ctx)`` takes one guide site as :mod:`pyro_vae.infer.site_gradients` hands it over
(:class:`~pyro_vae.infer.site_context.SiteContext`: the detached draw ``b``, the guide's distribution, the site's
cost ``f(value)``, ``log p(x, z) - log q(z)`` per plate entry with every other latent at its drawn value) and
returns a term whose gradient with respect to the guide's parameters at the site is the estimate ``G`` of
``d/dtheta E_q f``. For a Bernoulli site with logits ``phi`` and probabilities ``sigma = sigmoid(phi)``:

- :func:`enumerate_term`: ``G = sum_c f(c) d q(c)`` over every configuration ``c`` of the site's event (``2^D``
  for ``D`` Bernoulli coordinates, ``K^G`` for ``G`` categorical groups of ``K``): the exact gradient given the
  other latents, at one model evaluation per configuration; refused above :data:`MAX_CONFIGURATIONS`.
- :func:`arm_term`: augment-REINFORCE-merge (Yin & Zhou 2019), ``G_phi = (f(b~) - f(b)) (u - 1/2)``, where
  ``b = 1[u < sigma]`` is the draw (``u`` drawn uniform given ``b``) and ``b~ = 1[u > 1 - sigma]`` its
  antithetic partner; two evaluations (google-research/google-research ``disarm/binary``, ``grad_type="arm"``;
  mingzhang-yin/ARM-gradient).
- :func:`disarm_term`: DisARM (Dong, Mnih & Tucker 2020), ARM with the augmentation integrated out:
  ``G_phi = 1/2 (f(b~) - f(b)) 1[b != b~] (-1)^b sigmoid(|phi|)``; two evaluations, never more variance than
  ARM.
- :func:`muprop_term`: MuProp (Gu et al. 2016), the first-order Taylor expansion of ``f`` at the mean-field point
  ``mu = sigma`` as control variate: ``G = (f(b) - eta_0 f(mu) - eta_1 f'(mu).(b - mu) - B(x)) d log q(b) + eta_1
  f'(mu) d mu`` (``f`` at the probabilities: the model is evaluated at a relaxed value, one forward and one
  backward pass); the scales ``eta`` and the baseline ``B(x)`` of :class:`MuPropParameters` are learned, as in
  tensorflow/models ``research/rebar`` (``SBNMuProp``), by minimizing the squared learning signal (plain MuProp at
  first: ``eta = 1``, ``B = 0``).
- :func:`nvil_term`: NVIL (Mnih & Gregor 2014), REINFORCE with the learned input-dependent baseline ``B(x)`` of an
  :class:`NVILBaseline` and variance normalization: ``G = (f(b) - B(x) - c) / max(1, sqrt(v)) d log q(b)``, with
  ``c`` and ``v`` running averages of the mean and the squared deviation of ``f - B(x)``; ``B`` is trained to regress
  ``f - c`` (the term also carries ``-1/2 (f - c - B(x))^2``, so maximizing the ELBO minimizes the squared
  error). Any family.

Every estimate is unbiased for ``d/dtheta E_q f`` except NVIL's, which is that gradient divided by
``max(1, sqrt(v))`` (an adaptive step size; exactly unbiased while ``v <= 1``, e.g. for a fresh module).

The categorical extensions of ARM and DisARM are not implemented: they are different estimators (ARSM, Yin et al.
2019, needs up to ``K (K - 1) / 2`` pseudo-action evaluations per group; the coupled estimators of Dong et al.
2021 need a sampling coupling of their own), not the Bernoulli formulas applied per category. MuProp needs the
cost at the mean-field point, which a one-hot categorical's log-density (an argmax) does not define: it is refused
on categorical sites too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.estimators import NeuralBaseline, unwrap_independent
from pyro_vae.infer.site_context import SiteContext

__all__ = ["MAX_CONFIGURATIONS", "num_configurations", "configurations", "enumerate_term", "conditional_uniform",
           "arm_term", "disarm_term", "MuPropParameters", "muprop_term", "NVILBaseline", "nvil_term"]

#: The most configurations of one site's event that ``"enumerate"`` sums over (one model evaluation each).
MAX_CONFIGURATIONS = 4096


def _support(ctx: SiteContext) -> tuple[torch.Tensor, torch.Size, int]:
    """The support of one cell (``(n, *cell_event_shape)``), the shape of the cells in the site's event and their
    number, or :class:`ConfigError` for a family that cannot be enumerated."""
    family, dims = unwrap_independent(ctx.base)
    if not family.has_enumerate_support:
        raise ctx.refuse("a guide distribution with a finite support (Bernoulli, categorical)",
                         'use "rloo" or a score-function estimator')
    reinterpreted = sum(dims)
    batch = family.batch_shape
    cell_shape = batch[len(batch) - reinterpreted:] if reinterpreted else torch.Size()
    support = family.enumerate_support(expand=False)
    support = support.reshape(support.shape[0], *family.event_shape)
    return support, cell_shape, math.prod(cell_shape)


def num_configurations(ctx: SiteContext) -> int:
    """The number of configurations of the site's event: ``n ** cells`` (``2^D`` for ``D`` Bernoulli
    coordinates); :class:`ConfigError` for a family without a finite support."""
    support, _, cells = _support(ctx)
    return int(support.shape[0]) ** cells


def configurations(ctx: SiteContext) -> Iterator[torch.Tensor]:
    """Every configuration of the site's event, each broadcast to the value's shape ``(*batch_shape,
    *event_shape)`` (the same configuration for every plate entry).

    Raises:
        ConfigError: more than :data:`MAX_CONFIGURATIONS`, or a family without a finite support.
    """
    support, cell_shape, cells = _support(ctx)
    n = int(support.shape[0])
    count = n ** cells
    if count > MAX_CONFIGURATIONS:
        raise ConfigError(message(
            f'estimator "{ctx.est.name}" at site "{ctx.name}"',
            f"at most {MAX_CONFIGURATIONS} configurations of the site's event (one model evaluation each)",
            f"{n}^{cells} = {count}", 'use "disarm", "rloo" or another sampling estimator for this latent'))
    value = ctx.value
    event_shape = support.shape[1:]
    for index in itertools.product(range(n), repeat=cells):
        cfg = support[torch.tensor(index, dtype=torch.long, device=support.device)]
        yield cfg.reshape(torch.Size((*cell_shape, *event_shape))).to(value.dtype).expand(value.shape)


def enumerate_term(ctx: SiteContext) -> torch.Tensor:
    """``sum_c q(c) f(c)`` summed over plate entries, ``f`` detached: its gradient is the exact gradient of
    ``E_q f`` at the site (given the other latents' values), at one model evaluation per configuration."""
    total: torch.Tensor | float = 0.0
    for cfg in configurations(ctx):
        total = total + (ctx.base.log_prob(cfg).exp() * ctx.detached_cost(cfg)).sum()
    assert isinstance(total, torch.Tensor)
    return total


def _bernoulli(ctx: SiteContext) -> torch.distributions.Bernoulli:
    family = ctx.family
    if not isinstance(family, torch.distributions.Bernoulli):
        raise ctx.refuse("a Bernoulli guide distribution with values in {0, 1} (to_event allowed)",
                         'use the exact Bernoulli latent (VAE(latent="bernoulli") without relaxed=True), or "rloo", '
                         '"nvil" or "enumerate", which apply to other discrete sites too')
    return family


def conditional_uniform(value: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``u ~ U(0, 1)`` conditioned on ``1[u < probs] = value``: uniform on ``(0, p)`` where ``value`` is 1 and on
    ``(p, 1)`` where it is 0, of ``value``'s shape; so a draw ``b`` of ``Bernoulli(probs)`` and this ``u`` are
    jointly the augmentation of ARM and DisARM."""
    v = torch.rand_like(value)
    return torch.where(value > 0.5, probs * v, probs + (1 - probs) * v)


def _antithetic(ctx: SiteContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """``(b, b~, u, f(b) - f(b~) broadcast over the event, logits)`` of a Bernoulli site."""
    family = _bernoulli(ctx)
    b = ctx.value
    logits = family.logits
    probs = torch.sigmoid(logits.detach()).expand(b.shape)
    u = conditional_uniform(b, probs)
    b_anti = (u > 1 - probs).to(b.dtype)
    diff = ctx.detached_cost(b_anti) - ctx.detached_cost(b)
    diff = diff.reshape(diff.shape + (1,) * ctx.event_dim)
    return b, b_anti, u, diff, logits


def arm_term(ctx: SiteContext) -> torch.Tensor:
    """ARM (Yin & Zhou 2019): ``G_phi = (f(b~) - f(b)) (u - 1/2)`` per coordinate, ``term = (G . phi).sum()``."""
    _, _, u, diff, logits = _antithetic(ctx)
    return ((diff * (u - 0.5)).detach() * logits).sum()


def disarm_term(ctx: SiteContext) -> torch.Tensor:
    """DisARM (Dong et al. 2020): ``G_phi = 1/2 (f(b~) - f(b)) 1[b != b~] (-1)^b sigmoid(|phi|)`` per coordinate,
    ``term = (G . phi).sum()``."""
    b, b_anti, _, diff, logits = _antithetic(ctx)
    factor = (b - b_anti).abs() * (1 - 2 * b) * torch.sigmoid(logits.detach().abs())
    return ((0.5 * diff * factor).detach() * logits).sum()


def _zero_output(net: NeuralBaseline) -> NeuralBaseline:
    """``net`` with its last linear layer zeroed: the baseline starts at 0."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


class MuPropParameters(nn.Module):
    """MuProp's learned parts, as in tensorflow/models ``research/rebar`` (``SBNMuProp``): the scales ``eta =
    (eta_0, eta_1)`` of the Taylor expansion's value and linear term (both 1 at first: plain MuProp) and an
    input-dependent baseline ``B(x)`` (:class:`~pyro_vae.infer.estimators.NeuralBaseline`, 0 at first), all trained
    to minimize the squared learning signal; any values keep the estimate unbiased.

    Args:
        data_shape: the shape of one data point.
        hidden: hidden widths of the baseline's MLP.
    """

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        self.net = _zero_output(NeuralBaseline(data_shape, hidden))
        self.eta = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B(x)``: ``(..., *data_shape) -> (...)``, nats."""
        return self.net(x)


def muprop_term(ctx: SiteContext) -> torch.Tensor:
    """MuProp (Gu et al. 2016) at a Bernoulli site: the score-function term of the learning signal ``l = f(b) -
    eta_0 f(mu) - eta_1 f'(mu).(b - mu) - B(x)`` (the first-order expansion at the mean-field point ``mu =
    sigma(phi)``, held fixed, scaled by the learned ``eta`` of :class:`MuPropParameters`, and its baseline), plus
    ``eta_1 f'(mu) . mu``, whose gradient is that of the expansion's expectation; minus ``1/2 l^2``, which trains
    ``eta`` and ``B`` (the ELBO is maximized). The baseline and ``l`` in that squared error are in nats per data
    point (the costs divided by :attr:`~pyro_vae.infer.site_context.SiteContext.cost_units`, ``num_data /
    batch``), the score term multiplied back. ``f`` is evaluated at ``mu`` through the relaxed cost of the context
    (no support checks: the Bernoulli log-densities at a probability are their linear extension).

    Raises:
        ConfigError: a site that is not Bernoulli; no :class:`MuPropParameters` or data batch.
    """
    family = _bernoulli(ctx)
    module = _learned(ctx, MuPropParameters)
    b = ctx.value
    cost = ctx.relaxed_cost or ctx.cost
    mu = family.probs.detach().expand(b.shape).clone()  # its own memory: differentiated by torch.func
    batch = b.shape[: b.dim() - ctx.event_dim]

    def total(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = cost(z)
        return c.sum(), c

    slope, f_mu = grad(total, has_aux=True)(mu)
    slope, f_mu = slope.detach(), f_mu.detach()
    linear = (slope * (b - mu)).reshape(*batch, -1).sum(-1) if ctx.event_dim else slope * (b - mu)
    units = ctx.cost_units  # the signal and B(x) in nats per data point; the score term scaled back
    f = ctx.detached_cost(b)
    baseline = _baseline(ctx, module, f)
    eta0, eta1 = module.eta[0], module.eta[1]
    signal = (f - eta0 * f_mu - eta1 * linear) / units - baseline
    term = units * (signal.detach() * ctx.base.log_prob(b)).sum() + (eta1.detach() * slope * family.probs).sum()
    return term - 0.5 * signal.pow(2).sum()


def _learned(ctx: SiteContext, kind: type[nn.Module]) -> Any:
    if not isinstance(ctx.module, kind):
        raise ConfigError(message(f'estimator "{ctx.est.name}" at site "{ctx.name}"', f"a {kind.__name__} module",
                                  type(ctx.module).__name__, f'build the ELBO with make_elbo(..., estimator='
                                  f'"{ctx.est.name}", data_shape=vae.data_shape)'))
    return ctx.module


def _baseline(ctx: SiteContext, module: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """The module's ``B(x)`` of the model's first argument, broadcast to the cost's shape."""
    x = ctx.args[0] if ctx.args else ctx.kwargs.get("x")
    if not isinstance(x, torch.Tensor):
        raise ConfigError(message(f'estimator "{ctx.est.name}" at site "{ctx.name}"',
                                  "the data batch as the model's first argument (the baseline's input)",
                                  type(x).__name__, "call the model and guide with the batch x first"))
    out = module(x)
    try:
        return out.expand(torch.broadcast_shapes(out.shape, f.shape))
    except RuntimeError as e:
        raise ConfigError(message(f'baseline of estimator "{ctx.est.name}" at site "{ctx.name}"',
                                  f"an output broadcastable to the site's plates {tuple(f.shape)}",
                                  f"shape {tuple(out.shape)}",
                                  "give the baseline the data batch whose points the site's plate runs over")) from e


class NVILBaseline(nn.Module):
    """NVIL's learned parts (Mnih & Gregor 2014): the input-dependent baseline ``B(x)``
    (:class:`~pyro_vae.infer.estimators.NeuralBaseline`, an MLP from ``(..., *data_shape)`` to ``(...)``, 0 at first)
    and the running mean ``c`` and variance ``v`` of the learning signal ``f / s - B(x)``, all in nats per data
    point (:func:`nvil_term`; ``c`` and ``v`` are buffers, so they are checkpointed and resumed with the module).

    Args:
        data_shape: the shape of one data point.
        hidden: hidden widths of the baseline's MLP.
        decay: ``alpha`` of the running averages, ``c <- alpha c + (1 - alpha) mean(f - B)`` (0.8 in the paper).
    """

    mean: torch.Tensor
    var: torch.Tensor

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (64,), decay: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(message("decay", "a number in [0, 1)", repr(decay), "pass decay=0.8"))
        self.net = _zero_output(NeuralBaseline(data_shape, hidden))
        self.decay = float(decay)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B(x)``: ``(..., *data_shape) -> (...)``, nats."""
        return self.net(x)

    def scale(self) -> torch.Tensor:
        """The variance normalization's divisor ``max(1, sqrt(v))``."""
        return self.var.sqrt().clamp_min(1.0)

    @torch.no_grad()
    def update(self, signal: torch.Tensor) -> None:
        """Move ``c`` towards the mean of the learning signals ``signal`` (any shape) and ``v`` towards the mean of
        their squared deviation from ``c`` (a running variance over steps, not only within a batch)."""
        a = self.decay
        self.mean.mul_(a).add_((1 - a) * signal.mean())
        self.var.mul_(a).add_((1 - a) * (signal - self.mean).pow(2).mean())


def nvil_term(ctx: SiteContext) -> torch.Tensor:
    """NVIL at one site: ``s ((f / s - B(x) - c) / max(1, sqrt(v))) log q(b)`` (signal detached) minus the
    baseline's squared error ``1/2 (f / s - c - B(x))^2``, both summed over plate entries; then, while training,
    ``c`` and ``v`` move towards the statistics of ``f / s - B(x)``. ``s`` is the scale of the cost
    (:attr:`~pyro_vae.infer.site_context.SiteContext.cost_units`, ``num_data / batch``), so that ``B``, ``c`` and
    ``v`` are in nats per data point, as in Mnih & Gregor (2014), whatever the batch size. ``x`` is the model's
    first argument (the data batch).

    Raises:
        ConfigError: no :class:`NVILBaseline` (the ELBO's learned module), no data batch, or a baseline whose output
            does not broadcast to the site's plates.
    """
    module = _learned(ctx, NVILBaseline)
    units = ctx.cost_units  # B(x), c and v in nats per data point; the score term scaled back
    f = ctx.detached_cost(ctx.value) / units
    baseline = _baseline(ctx, module, f)
    signal = f - baseline.detach()
    centred = (signal - module.mean) / module.scale()
    term = units * (centred * ctx.base.log_prob(ctx.value)).sum() - 0.5 * (f - module.mean - baseline).pow(2).sum()
    if ctx.training and module.training:
        module.update(signal)
    return term

