"""Training of the semi-supervised model :class:`~pyro_vae.models.ssvae.SSVAE` (Kingma et al. 2014) by
minibatch SVI under ``TraceEnum_ELBO``, and the labelled-points-only classifier it is compared with."""

from __future__ import annotations

import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch import nn

from pyro_vae.data import check_binarizable
from pyro_vae.errors import ConfigError, NonFiniteLossError, message
from pyro_vae.models.ssvae import SSVAE
from pyro_vae.validation import integer

__all__ = ["fit_semisupervised", "fit_classifier"]


def fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 2000, lr: float = 1e-3,
                   weight_decay: float = 0.0) -> nn.Module:
    """Fit ``net`` (inputs ``(N, ...)`` to logits ``(N, K)``) by full-batch Adam on the cross-entropy: the
    labelled-points-only baseline a semi-supervised model has to beat. Returns ``net``, in eval mode.

    Raises:
        ConfigError: ``steps`` is not an integer >= 1.
    """
    optim = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    for _ in range(integer("steps", steps, 1)):
        loss = F.cross_entropy(net(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    net.eval()
    return net


def fit_semisupervised(
    ssvae: SSVAE,
    x_labelled: torch.Tensor,
    y_labelled: torch.Tensor,
    x_unlabelled: torch.Tensor,
    *,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    enumeration: str | None = "parallel",
    dynamic_binarize: bool = False,
    seed: int = 0,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    time_budget: float | None = None,
) -> list[dict[str, float]]:
    """Train an :class:`~pyro_vae.models.ssvae.SSVAE` by minibatch SVI under ``TraceEnum_ELBO``.

    Each step takes one unlabelled batch (``y`` enumerated in the guide with ``config_enumerate``, or
    sampled, with a score-function gradient, when ``enumeration=None``) and one labelled batch (``y``
    observed), each scaled to its full set, so each pair of steps is an unbiased estimate of the whole
    objective of Kingma et al. (2014): the labelled and the unlabelled bounds plus the classification term.

    Args:
        ssvae: the model, already on its device (the data are moved there).
        x_labelled, y_labelled: ``(N_l, *data_shape)`` and ``(N_l,)``.
        x_unlabelled: ``(N_u, *data_shape)``.
        enumeration: ``"parallel"`` (exact sum over ``y``), ``"sequential"``, or ``None`` (score function).
        dynamic_binarize: draw binary data from the grey levels afresh each batch.
        callback: called as ``callback(epoch, record)`` after each epoch.
        time_budget: stop after the epoch during which this many seconds have passed.

    Returns:
        One record per epoch, nats per point: ``epoch``; ``loss_unlabelled``, the negative bound on
        ``log p(x)``; ``loss_labelled``, the labelled points' training objective: the negative bound on
        ``log p(x, y)`` minus ``aux_weight * log q(y | x)`` (a bound only when ``aux_weight`` is 0);
        ``seconds``.

    Raises:
        ConfigError: an ``enumeration`` or ``epochs`` that is not one of the above.
        DataError: grey levels outside [0, 1] with ``dynamic_binarize=True``.
        NonFiniteLossError: the loss of a step is NaN or infinite.
    """
    if enumeration not in ("parallel", "sequential", None):
        raise ConfigError(message("enumeration", '"parallel", "sequential" or None', repr(enumeration),
                                  'pass enumeration="parallel"'))
    device = ssvae.device
    if dynamic_binarize:  # grey levels are probabilities of a one: refused outside [0, 1], never clamped
        check_binarizable(x_labelled, "x_labelled (dynamic_binarize=True)")
        check_binarizable(x_unlabelled, "x_unlabelled (dynamic_binarize=True)")
    xl, yl, xu = x_labelled.to(device), y_labelled.to(device), x_unlabelled.to(device)
    n_l, n_u = xl.shape[0], xu.shape[0]
    guide = config_enumerate(ssvae.guide, enumeration) if enumeration else ssvae.guide
    # Sampled y: Trace_ELBO adds the score-function term for it.
    elbo_u = TraceEnum_ELBO(max_plate_nesting=1) if enumeration else Trace_ELBO(max_plate_nesting=1)
    elbo_l = Trace_ELBO(max_plate_nesting=1)  # nothing to enumerate where y is observed
    gen = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    optim = torch.optim.Adam(ssvae.parameters(), lr=lr)

    def step(xb: torch.Tensor, yb: torch.Tensor | None, n: int) -> float:
        if dynamic_binarize:
            xb = torch.bernoulli(xb)
        elbo = elbo_u if yb is None else elbo_l
        loss = elbo.differentiable_loss(ssvae.model, guide, xb, yb, n)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(message("SSVAE loss", "a finite value", str(loss.item()),
                                             "lower the learning rate or check the data"))
        optim.zero_grad()
        loss.backward()
        optim.step()
        return float(loss.detach())

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bl = min(batch_size, n_l)
    for epoch in range(1, integer("epochs", epochs, 1) + 1):
        ssvae.train()
        lu = ll = 0.0
        perm = torch.randperm(n_u, generator=gen).to(device)
        batches = perm.split(batch_size)
        for idx in batches:
            lab = torch.randperm(n_l, generator=gen)[:bl].to(device)
            lu += step(xu[idx], None, n_u)
            ll += step(xl[lab], yl[lab], n_l)
        record = {"epoch": epoch, "loss_unlabelled": lu / (len(batches) * n_u),
                  "loss_labelled": ll / (len(batches) * n_l), "seconds": time.perf_counter() - start}
        history.append(record)
        if callback is not None:
            callback(epoch, record)
        if time_budget is not None and record["seconds"] > time_budget:
            break
    ssvae.eval()
    return history
