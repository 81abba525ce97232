"""One optimization step of minibatch SVI: Pyro's ELBO on the model/guide traces, backward, a torch optimizer step.

The loss comes from :func:`pyro_vae.infer.elbo_loss` (Pyro's own traces, no host synchronization) or, for any
other ELBO, from Pyro's ``loss_and_grads`` unchanged. Every step records Pyro's own model and guide traces: a
part whose structure depends on its own state (a ``pyro.factor`` added after some steps, a site that appears
later) is scored as Pyro scores it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import pyro
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled

from pyro_vae.infer.losses import elbo_loss, fast_kind
from pyro_vae.models.vae import VAE

__all__ = ["svi_step", "clip_grad_norm_"]


def svi_step(loss_fn: ELBO, vae: torch.nn.Module, xb: torch.Tensor, num_data: int,
             optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
             clip_norm: float | None = None, *, validate: bool | None = None,
             check_finite: bool = True, context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Zero the gradients, compute the ELBO's loss and gradients on ``xb`` (scaled to ``num_data``),
    optionally clip, step.

    Args:
        loss_fn: the ELBO.
        vae: the model/guide pair (``vae.model``, ``vae.guide``).
        xb: ``(batch, *data_shape)`` minibatch, on the parameters' device.
        num_data: size of the full data set (the minibatch's log-densities are scaled by ``num_data / batch``).
        optimizer, params: the torch optimizer and the parameters it steps (for clipping).
        clip_norm: clip the gradient's global norm to this value.
        validate: ``False`` runs the step under ``pyro.validation_enabled(False)`` (no per-step argument,
            support and site-shape checks) and without re-registering a :class:`~pyro_vae.VAE`'s modules with
            Pyro's param store: for the steps after the first, once the data have been checked whole (as
            :func:`pyro_vae.fit` does). ``True`` forces validation on; ``None`` keeps the global setting.
        check_finite: ``True`` skips the optimizer step when the loss is not finite (a host synchronization on
            the GPU); ``False`` never waits for the device and leaves the check to the caller.
        context: named context for the minibatch, passed to the model and guide as keyword arguments
            (``vae.model(xb, num_data=num_data, **context)``): per-data-point values hold ``xb``'s rows.

    Returns:
        The loss (negative ELBO estimate for the whole data set), a detached 0-dim tensor on ``xb``'s device.
    """
    kwargs = dict(context or {})
    if validate is None:
        return _step(loss_fn, vae, xb, num_data, optimizer, params, clip_norm, check_finite, kwargs)
    with _hot_loop(vae, validate, loss_fn):
        return _step(loss_fn, vae, xb, num_data, optimizer, params, clip_norm, check_finite, kwargs)


@contextlib.contextmanager
def _hot_loop(vae: torch.nn.Module, validate: bool, loss_fn: ELBO) -> Iterator[None]:
    """Pyro's validation set to ``validate``. With ``validate=False`` and an ELBO that :func:`elbo_loss`
    handles, a :class:`~pyro_vae.VAE` also skips re-registering its modules with Pyro's param store
    (registered by an earlier step; the step differentiates the modules' own parameters). Other ELBOs keep
    the registration: their ``loss_and_grads`` differentiates only when the trace holds param sites."""
    with contextlib.ExitStack() as stack:
        if validate != is_validation_enabled():
            stack.enter_context(pyro.validation_enabled(validate))
        if not validate and isinstance(vae, VAE) and fast_kind(loss_fn) is not None:
            stack.enter_context(vae.modules_registered())
        yield


def _step(loss_fn: ELBO, vae: torch.nn.Module, xb: torch.Tensor, num_data: int,
          optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], clip_norm: float | None,
          check_finite: bool, context: dict[str, Any]) -> torch.Tensor:
    # methods of the pair (nn.Module's __getattr__ would type them as Tensor | Module)
    model, guide = cast(Callable[..., Any], vae.model), cast(Callable[..., Any], vae.guide)
    optimizer.zero_grad(set_to_none=True)
    out = elbo_loss(loss_fn, model, guide, xb, num_data=num_data, **context)
    if out is None:
        # every Pyro ELBO defines loss_and_grads; the ELBO base class does not declare it
        loss = torch.tensor(loss_fn.loss_and_grads(model, guide, xb, num_data=num_data,  # type: ignore[attr-defined]
                                                   **context), device=xb.device)
    else:
        loss, surrogate = out
        if surrogate.requires_grad:
            surrogate.backward()
    if check_finite and not math.isfinite(loss):
        return loss  # no step: the caller raises, the parameters stay as they were
    if clip_norm is not None:
        clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss


@torch.no_grad()
def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` in place so that their global 2-norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does, but without overflow: the norm is computed from the gradients
    divided by their largest entry, so float32 gradients with entries beyond ~1.8e19 (whose squares overflow)
    are clipped, not zeroed. No host synchronization (a CUDA graph can record it).

    Returns:
        the global 2-norm before clipping, as a float64 tensor (NaN or infinite iff an entry is).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    amax = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
    scale = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.ones_like(amax))
    scaled = torch.nn.utils.get_total_norm([g / scale.to(g.device, g.dtype) for g in grads])  # <= sqrt(numel)
    norm = scaled.double() * scale.double()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return norm
