"""What :func:`pyro_vae.fit` returns and what its callbacks see: :class:`History`, :class:`TrainState`, and the
:class:`EarlyStopping` callback. Callbacks are plain objects with optional ``on_fit_start(state)``,
``on_step(state)`` and ``on_epoch_end(state)`` methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_vae.infer.pair import ModelGuidePair
from pyro_vae.models.vae import VAE
from pyro_vae.validation import integer, number

__all__ = ["History", "TrainState", "EarlyStopping"]


@dataclass
class History:
    """Per-epoch records ``{"epoch", "step", "train_elbo", "train_objective", "beta", "val_elbo", "seconds"}``,
    in nats per data point:

    - ``train_objective``: what the steps maximized (``E_q[log p(x|z)] - beta KL``, or the importance-weighted
      bound under ``elbo="iwae"``): the estimate each optimizer step differentiated (its negative loss), on its
      minibatch at the parameters before its update, averaged over the epoch's data points (a resumed epoch's
      earlier minibatches included);
    - ``train_elbo``: the ELBO (KL weight 1), estimated the same way: the step's own loss when the objective is
      the ELBO with ``beta`` 1, else a second evaluation without gradients on the same minibatch at the same
      parameters, drawn from the same random state as the step. Under a KL weight both therefore use the same
      latents, and per minibatch ``train_objective - train_elbo = (1 - beta) KL`` of those latents (exactly the
      analytic KL under ``TraceMeanField_ELBO``; its Monte Carlo estimate under ``Trace_ELBO``), so with
      ``beta <= 1`` and an analytic KL ``train_objective >= train_elbo`` in every epoch. Under ``"iwae"`` it is
      a one-particle ``Trace_ELBO`` estimate, starting from the random state of the bound's ``K`` draws;
    - ``beta``: the VAE's KL weight at the end of the epoch (for a model/guide pair, that of the VAEs among its
      ``modules``, 1 without any, ``None`` when they differ; the ELBOs weigh every one of them by 1);
    - ``val_elbo``: the ELBO of the validation data at the epoch's end (``None`` without validation data).
      Best-model selection (``best.pt``) and :class:`EarlyStopping` use ``val_elbo`` (``train_elbo`` without
      validation data), never the objective."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, key: str) -> list[Any]:
        return [e[key] for e in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """``{"epochs": [record, ...]}``, JSON-able."""
        return {"epochs": self.epochs}


@dataclass
class TrainState:
    """What callbacks see: ``on_step(state)`` after every optimizer step, ``on_epoch_end(state)`` after
    every epoch (``state.stop = True`` ends training). ``loss`` is the last step's loss as a 0-dim tensor on
    the device (``float(state.loss)`` waits for it)."""

    vae: VAE | ModelGuidePair  # what fit trains: the VAE, or the model/guide pair
    optimizer: torch.optim.Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    loss: Any = math.nan
    stop: bool = False


class EarlyStopping:
    """Stop training when the validation ELBO (the training ELBO without validation data) has not improved by
    more than ``min_delta`` nats per data point for ``patience`` epochs. On resume it re-reads the restored
    history, so a resumed run stops where the uninterrupted one would have."""

    def __init__(self, patience: int = 10, min_delta: float = 0.0) -> None:
        self.patience = integer("patience", patience, 1)
        self.min_delta = number("min_delta", min_delta, 0.0, strict=False, fix="pass min_delta=0")
        self.best, self.bad_epochs = -math.inf, 0

    def _update(self, record: dict[str, Any]) -> bool:
        score = record["val_elbo"] if record.get("val_elbo") is not None else record["train_elbo"]
        if score > self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def on_fit_start(self, state: TrainState) -> None:
        """Start over, then re-read the records of a resumed run's history."""
        self.best, self.bad_epochs = -math.inf, 0
        for record in state.history.epochs:
            self._update(record)

    def on_epoch_end(self, state: TrainState) -> None:
        """Read the epoch's record; set ``state.stop`` after ``patience`` epochs without improvement."""
        if self._update(state.history.epochs[-1]):
            state.stop = True
