"""The training step captured as a CUDA graph (:class:`CUDAGraphStep`) and the checks that refuse, before any
work, the configurations whose step a graph cannot replay faithfully.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.infer import ELBO

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.losses import fast_kind
from pyro_vae.models.vae import VAE
from pyro_vae.schedules import Schedule
from pyro_vae.train.step import svi_step
from pyro_vae.validation import integer

__all__ = ["CUDAGraphStep", "check_cuda_graph", "set_capturable"]


def check_cuda_graph(vae: VAE, dev: torch.device, ctx: Any, estimator: str, elbo: Any,
                      callbacks: Sequence[Any]) -> None:
    """Refuse, before any work, the configurations whose step a CUDA graph cannot replay faithfully."""
    def refuse(found: str, fix: str) -> ConfigError:
        return ConfigError(message("cuda_graph=True", "a Gaussian VAE on a CUDA device, trained by one process "
                                   "with the pathwise estimator", found, fix))

    for cb in callbacks:
        if isinstance(cb, Schedule):
            raise refuse(f"callback {cb!r}, which changes a value the captured step reads from Python",
                         "drop the schedule, or pass cuda_graph=False")
    if getattr(vae, "latent", "gaussian") != "gaussian":
        why = "its temperature is Python state" if getattr(vae, "relaxed", False) else "not a Gaussian latent"
        raise refuse(f"latent={vae.latent!r} ({why})", "pass cuda_graph=False")
    if estimator != "pathwise":
        raise refuse(f"estimator={estimator!r}", "pass cuda_graph=False for other gradient estimators")
    if not isinstance(elbo, str) and fast_kind(elbo) is None:
        raise refuse(f"elbo={type(elbo).__name__}", "use elbo=\"trace\" or \"meanfield\", or cuda_graph=False")
    if ctx.enabled:
        raise refuse(f"{ctx.world_size} processes", "pass cuda_graph=False for data-parallel training")
    if dev.type != "cuda":
        raise refuse(f"device {dev}", "pass device=\"cuda\", or cuda_graph=False")


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """A checkpoint restores the optimizer's ``capturable`` flag too; this run's setting wins, with Adam's step
    counters where that setting needs them (on the parameters' device, or on the CPU)."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device if capturable else "cpu", dtype=torch.float32)


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
                 clip_norm: float | None = None, warmup: int = 3) -> None:
        if not example.is_cuda:
            raise ConfigError(message("CUDAGraphStep example", "a CUDA tensor", f"a tensor on {example.device}",
                                      "move the VAE and the data to a CUDA device, or use svi_step"))
        if fast_kind(loss_fn) is None:
            raise ConfigError(message("CUDAGraphStep loss_fn", "Trace_ELBO or TraceMeanField_ELBO",
                                      type(loss_fn).__name__, "use svi_step for other ELBOs"))
        if getattr(vae, "latent", "gaussian") != "gaussian":
            raise ConfigError(message("CUDAGraphStep vae", 'a Gaussian latent (latent="gaussian")',
                                      f"latent={vae.latent!r}, whose temperature is read from Python every step",
                                      "use svi_step for relaxed categorical latents"))
        if any(not g.get("capturable", False) for g in optimizer.param_groups if "capturable" in g):
            raise ConfigError(message("CUDAGraphStep optimizer", "a capturable optimizer", "capturable=False",
                                      "build it with torch.optim.Adam(params, lr=..., capturable=True)"))
        warmup = integer("CUDAGraphStep warmup", warmup, 1, fix="pass warmup=3")
        self.static_x = example.detach().clone()
        self._args = (loss_fn, vae, num_data, optimizer, params, clip_norm)
        self._side = torch.cuda.Stream(device=example.device)
        self._warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: torch.Tensor | None = None
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
        with torch.cuda.graph(self.graph):
            self.static_loss = svi_step(loss_fn, vae, self.static_x, num_data, optimizer, params, clip_norm,
                                        validate=False, check_finite=False)
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
        assert self.graph is not None and self.static_loss is not None  # set by _capture
        self.graph.replay()
        return self.static_loss
