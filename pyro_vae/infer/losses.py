"""Pyro's ELBO loss and surrogate loss as tensors, without host synchronization.

For ``Trace_ELBO`` and ``TraceMeanField_ELBO`` the surrogate loss is assembled from the traces Pyro records
(:func:`pyro_vae.pyro_internals.particle_traces`: the sites' ``log_prob_sum``, ``score_parts`` and, for the
mean-field ELBO, the registered ``kl_divergence``) without the ``.item()`` calls of ``ELBO.loss_and_grads``, so a
training step queues its work on the GPU without waiting for it. Its value and gradients are those of Pyro's
``loss_and_grads`` (``tests/test_step.py`` checks them parameter by parameter); sites with a score-function
term, and every other ELBO, go through Pyro's own code unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled

from pyro_vae.pyro_internals import particle_loss, particle_traces

__all__ = ["elbo_loss", "fast_kind"]


def _trace_particle(loss_fn: Trace_ELBO, model_trace: Any, guide_trace: Any) -> tuple[torch.Tensor, torch.Tensor]:
    surrogate: Any = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            surrogate = surrogate + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            _, score_function_term, entropy_term = site["score_parts"]
            if not is_identically_zero(score_function_term):
                loss, surrogate_loss = particle_loss(type(loss_fn))(loss_fn, model_trace, guide_trace)
                return torch.as_tensor(loss, device=surrogate_loss.device), surrogate_loss
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
    surrogate = torch.as_tensor(-surrogate)
    return surrogate.detach(), surrogate


def _mean_field_particle(model_trace: Any, guide_trace: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # TraceMeanField_ELBO's particle loss (pyro_internals.particle_loss) without its torch_item: analytic KL
    # where one is registered, Monte Carlo otherwise.
    elbo: Any = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        if is_validation_enabled():
            check_fully_reparametrized(guide_site)
        try:
            kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
            continue
        kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
        if torch.is_tensor(kl_qp):
            kl_sum = kl_qp.sum()
        else:
            kl_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
        elbo = elbo - kl_sum
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    surrogate = torch.as_tensor(-elbo)
    return surrogate.detach(), surrogate


def fast_kind(loss_fn: ELBO) -> type | None:
    """``Trace_ELBO`` or ``TraceMeanField_ELBO`` when ``loss_fn`` is one of them, or a subclass that keeps
    their ``loss_and_grads`` and particle loss (e.g. one that only changes how traces are drawn); else ``None``."""
    for base in (TraceMeanField_ELBO, Trace_ELBO):
        if isinstance(loss_fn, base):
            cls = type(loss_fn)
            if cls.loss_and_grads is base.loss_and_grads and particle_loss(cls) is particle_loss(base):
                return base
    return None


def elbo_loss(loss_fn: ELBO, model: Callable, guide: Callable, *args: Any,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loss, surrogate_loss)`` as tensors, with no host synchronization, for ``Trace_ELBO`` and
    ``TraceMeanField_ELBO`` (and subclasses that keep their ``loss_and_grads`` and particle loss, such as
    :class:`pyro_vae.infer.estimators.EstimatorTrace_ELBO`); ``None`` for any other ELBO.

    ``loss`` is the detached negative ELBO estimate (averaged over particles); ``surrogate_loss`` is what
    Pyro differentiates (equal to ``loss`` in value unless a guide site has a score-function term).
    """
    return _elbo_loss(loss_fn, model, guide, args, kwargs)


def _elbo_loss(loss_fn: ELBO, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    kind = fast_kind(loss_fn)
    if kind is None:
        return None
    loss: Any = 0.0
    surrogate: Any = 0.0
    for model_trace, guide_trace in particle_traces(loss_fn, model, guide, args, kwargs):
        if kind is Trace_ELBO:
            loss_p, surrogate_p = _trace_particle(cast(Trace_ELBO, loss_fn), model_trace, guide_trace)
        else:
            loss_p, surrogate_p = _mean_field_particle(model_trace, guide_trace)
        loss = loss + loss_p / loss_fn.num_particles
        surrogate = surrogate + surrogate_p / loss_fn.num_particles
    return loss, surrogate
