"""One optimization step of minibatch SVI: Pyro's ELBO on the model/guide traces, backward, a torch optimizer step.

For ``Trace_ELBO`` and ``TraceMeanField_ELBO`` the surrogate loss is assembled from the traces Pyro records
(``ELBO._get_traces``: the sites' ``log_prob_sum``, ``score_parts`` and, for the mean-field ELBO, the
registered ``kl_divergence``) without the ``.item()`` calls of ``ELBO.loss_and_grads``, so a step queues its
work on the GPU without waiting for it. Its value and gradients are those of Pyro's ``loss_and_grads``
(``tests/test_step.py`` checks them parameter by parameter); sites with a score-function term, and every other
ELBO, go through Pyro's own code unchanged.

Every step records Pyro's own model and guide traces: a part whose structure depends on its own state (a
``pyro.factor`` added after some steps, a site that appears later) is scored as Pyro scores it.

:class:`CUDAGraphStep` records the whole fixed-shape step (guide, model, ELBO, backward, Adam) once as a CUDA
graph and replays it, which removes Pyro's per-step Python cost on the GPU.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled

from .errors import ConfigError, message
from .vae import VAE

__all__ = ["svi_step", "elbo_loss", "clip_grad_norm_", "CUDAGraphStep"]


def _trace_particle(loss_fn: Trace_ELBO, model_trace: Any, guide_trace: Any) -> tuple[torch.Tensor, torch.Tensor]:
    surrogate: Any = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            surrogate = surrogate + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            _, score_function_term, entropy_term = site["score_parts"]
            if not is_identically_zero(score_function_term):
                loss, surrogate_loss = loss_fn._differentiable_loss_particle(model_trace, guide_trace)
                return torch.as_tensor(loss, device=surrogate_loss.device), surrogate_loss
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
    surrogate = torch.as_tensor(-surrogate)
    return surrogate.detach(), surrogate


def _mean_field_particle(model_trace: Any, guide_trace: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # TraceMeanField_ELBO._differentiable_loss_particle without its torch_item: analytic KL where one is
    # registered, Monte Carlo otherwise.
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


def _fast_kind(loss_fn: ELBO) -> Optional[type]:
    """``Trace_ELBO`` or ``TraceMeanField_ELBO`` when ``loss_fn`` is one of them, or a subclass that keeps
    their ``loss_and_grads`` and particle loss (e.g. one that only changes how traces are drawn); else ``None``."""
    cls = type(loss_fn)
    for base in (TraceMeanField_ELBO, Trace_ELBO):
        if (isinstance(loss_fn, base) and cls.loss_and_grads is base.loss_and_grads
                and cls._differentiable_loss_particle is base._differentiable_loss_particle):
            return base
    return None


def elbo_loss(loss_fn: ELBO, model: Callable, guide: Callable, *args: Any,
              **kwargs: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(loss, surrogate_loss)`` as tensors, with no host synchronization, for ``Trace_ELBO`` and
    ``TraceMeanField_ELBO`` (and subclasses that keep their ``loss_and_grads`` and particle loss, such as
    :class:`pyro_vae.estimators.EstimatorTrace_ELBO`); ``None`` for any other ELBO.

    ``loss`` is the detached negative ELBO estimate (averaged over particles); ``surrogate_loss`` is what
    Pyro differentiates (equal to ``loss`` in value unless a guide site has a score-function term).
    """
    return _elbo_loss(loss_fn, model, guide, args, kwargs)


def _elbo_loss(loss_fn: ELBO, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    kind = _fast_kind(loss_fn)
    if kind is None:
        return None
    loss: Any = 0.0
    surrogate: Any = 0.0
    for model_trace, guide_trace in loss_fn._get_traces(model, guide, args, kwargs):
        if kind is Trace_ELBO:
            loss_p, surrogate_p = _trace_particle(loss_fn, model_trace, guide_trace)
        else:
            loss_p, surrogate_p = _mean_field_particle(model_trace, guide_trace)
        loss = loss + loss_p / loss_fn.num_particles
        surrogate = surrogate + surrogate_p / loss_fn.num_particles
    return loss, surrogate


def svi_step(loss_fn: ELBO, vae: torch.nn.Module, xb: torch.Tensor, num_data: int,
             optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
             clip_norm: Optional[float] = None, *, validate: Optional[bool] = None,
             check_finite: bool = True) -> torch.Tensor:
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

    Returns:
        The loss (negative ELBO estimate for the whole data set), a detached 0-dim tensor on ``xb``'s device.
    """
    if validate is None:
        return _step(loss_fn, vae, xb, num_data, optimizer, params, clip_norm, check_finite)
    with _hot_loop(vae, validate, loss_fn):
        return _step(loss_fn, vae, xb, num_data, optimizer, params, clip_norm, check_finite)


@contextlib.contextmanager
def _hot_loop(vae: torch.nn.Module, validate: bool, loss_fn: ELBO) -> Iterator[None]:
    """Pyro's validation set to ``validate``. With ``validate=False`` and an ELBO that :func:`elbo_loss`
    handles, a :class:`~pyro_vae.VAE` also skips re-registering its modules with Pyro's param store
    (registered by an earlier step; the step differentiates the modules' own parameters). Other ELBOs keep
    the registration: their ``loss_and_grads`` differentiates only when the trace holds param sites."""
    skip = not validate and isinstance(vae, VAE) and _fast_kind(loss_fn) is not None
    with contextlib.ExitStack() as stack:
        if validate != is_validation_enabled():
            stack.enter_context(pyro.validation_enabled(validate))
        if skip:
            vae._registered = True
        try:
            yield
        finally:
            if skip:
                vae._registered = False


def _step(loss_fn: ELBO, vae: torch.nn.Module, xb: torch.Tensor, num_data: int,
          optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], clip_norm: Optional[float],
          check_finite: bool) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    out = _elbo_loss(loss_fn, vae.model, vae.guide, (xb,), {"num_data": num_data})
    if out is None:
        loss = torch.tensor(loss_fn.loss_and_grads(vae.model, vae.guide, xb, num_data=num_data), device=xb.device)
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


class CUDAGraphStep:
    """The training step captured as a CUDA graph and replayed for every minibatch of the same shape.

    Sound for a model and guide whose structure does not depend on the data's values and that read no
    Python state that changes between steps (the built-in Gaussian VAEs; not a relaxed categorical latent,
    whose temperature a schedule may change): the graph replays the kernels of one recorded step (guide,
    model, ``Trace_ELBO`` or ``TraceMeanField_ELBO`` surrogate, backward, optimizer step) on a static input
    buffer, with fresh random numbers at every replay. The first ``warmup`` calls run eagerly on a side
    stream (CUDA's lazy initializations must not happen during capture; they train like any other step);
    the next full-size call records the graph and replays it. The Python values the graph bakes in, the
    optimizer's learning rates and the VAE's ``beta``, are compared before every replay: when a scheduler
    has changed one, the step is recorded again. Validation is off inside the graph (check the data once
    beforehand, as :func:`pyro_vae.fit` does), and the optimizer must be capturable:
    ``torch.optim.Adam(..., capturable=True)``. Steps are not skipped on a non-finite loss: check the
    returned losses (they stay on the device) every so often.

    Args:
        loss_fn: ``Trace_ELBO`` or ``TraceMeanField_ELBO`` (reparameterized guides).
        vae: the model/guide pair, on a CUDA device.
        example: a ``(batch, *data_shape)`` minibatch of the shape that is replayed; calls with another
            shape (a short last batch) run the eager step.
        num_data, optimizer, params, clip_norm: as for :func:`svi_step`.
        warmup: eager calls, on a side stream, before the first capture (at least 1: the optimizer's state
            must exist before it is captured).
    """

    def __init__(self, loss_fn: ELBO, vae: torch.nn.Module, example: torch.Tensor, num_data: int,
                 optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 clip_norm: Optional[float] = None, warmup: int = 3) -> None:
        if not example.is_cuda:
            raise ConfigError(message("CUDAGraphStep example", "a CUDA tensor", f"a tensor on {example.device}",
                                      "move the VAE and the data to a CUDA device, or use svi_step"))
        if _fast_kind(loss_fn) is None:
            raise ConfigError(message("CUDAGraphStep loss_fn", "Trace_ELBO or TraceMeanField_ELBO",
                                      type(loss_fn).__name__, "use svi_step for other ELBOs"))
        if getattr(vae, "latent", "gaussian") != "gaussian":
            raise ConfigError(message("CUDAGraphStep vae", 'a Gaussian latent (latent="gaussian")',
                                      f"latent={vae.latent!r}, whose temperature is read from Python every step",
                                      "use svi_step for relaxed categorical latents"))
        if any(not g.get("capturable", False) for g in optimizer.param_groups if "capturable" in g):
            raise ConfigError(message("CUDAGraphStep optimizer", "a capturable optimizer", "capturable=False",
                                      "build it with torch.optim.Adam(params, lr=..., capturable=True)"))
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ConfigError(message("CUDAGraphStep warmup", "an integer >= 1", repr(warmup),
                                      "pass warmup=3"))
        self.static_x = example.detach().clone()
        self._args = (loss_fn, vae, num_data, optimizer, params, clip_norm)
        self._side = torch.cuda.Stream(device=example.device)
        self._warmup_left = warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_loss: Optional[torch.Tensor] = None
        self._key: tuple = ()

    def _baked(self) -> tuple:
        """The Python values a captured step has baked in."""
        _, vae, _, optimizer, _, _ = self._args
        return (tuple(float(g["lr"]) if not torch.is_tensor(g["lr"]) else id(g["lr"])
                      for g in optimizer.param_groups), getattr(vae, "beta", None))

    def _eager(self, xb: torch.Tensor) -> torch.Tensor:
        loss_fn, vae, num_data, optimizer, params, clip_norm = self._args
        return svi_step(loss_fn, vae, xb, num_data, optimizer, params, clip_norm, validate=False,
                        check_finite=False)

    def _capture(self) -> None:
        loss_fn, vae, num_data, optimizer, params, clip_norm = self._args
        optimizer.zero_grad(set_to_none=True)  # no tensor of an earlier capture's memory pool stays in use
        self.static_loss = self.graph = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _hot_loop(vae, False, loss_fn):
            self.static_loss = _step(loss_fn, vae, self.static_x, num_data, optimizer, params, clip_norm, False)
        self._key = self._baked()

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        """One training step on ``xb``; returns the loss, a 0-dim CUDA tensor (for a replayed step, one that
        the next replay overwrites: clone it to keep it)."""
        if xb.shape != self.static_x.shape:
            return self._eager(xb)
        if self._warmup_left > 0:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                loss = self._eager(xb)
            torch.cuda.current_stream().wait_stream(self._side)
            self._warmup_left -= 1
            return loss
        self.static_x.copy_(xb, non_blocking=True)
        if self.graph is None or self._baked() != self._key:
            self._capture()
        self.graph.replay()
        return self.static_loss
