"""One optimization step of minibatch SVI: Pyro's ``ELBO.loss_and_grads`` then a torch optimizer step."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from pyro.infer import ELBO

__all__ = ["svi_step"]


def svi_step(loss_fn: ELBO, vae: torch.nn.Module, xb: torch.Tensor, num_data: int,
             optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
             clip_norm: Optional[float] = None) -> float:
    """Zero the gradients, compute the ELBO's loss and gradients on ``xb`` (scaled to ``num_data``),
    optionally clip, step (skipped when the loss is not finite). Returns the loss (negative ELBO estimate for the whole data set)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn.loss_and_grads(vae.model, vae.guide, xb, num_data=num_data)
    if not math.isfinite(loss):
        return loss  # no step: the caller raises, the parameters stay as they were
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss
