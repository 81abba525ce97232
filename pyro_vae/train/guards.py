"""The guards of a training run: signals (SIGINT, SIGTERM) turned into a stop request read between steps, and
the non-finite loss and gradient checks, recorded on the device without waiting for it and raised at the next
synchronization.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from pyro_vae.checkpoint import has_checkpoint
from pyro_vae.errors import NonFiniteLossError, message
from pyro_vae.train import distributed
from pyro_vae.train.step import clip_grad_norm_

__all__ = ["StopOnSignal", "StepGuard", "reduce_flags", "check_finite_record"]


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM set a flag that training reads between steps; a second signal acts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepGuard:
    """An optimizer step pre-hook: in distributed runs it sums the ranks' weighted gradients (and clips the
    result); always it records, without waiting for the device, the first step whose loss or gradient is not
    finite. :meth:`sync` reads those records on the host and raises."""

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device, ctx: distributed.Context,
                 clip_norm: float | None, steps_per_epoch: int, ckpt_dir: Path | None) -> None:
        self.params, self.ctx, self.clip_norm = list(params), ctx, clip_norm
        self.steps_per_epoch, self.ckpt_dir = steps_per_epoch, ckpt_dir
        self.bad_loss = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_grad = torch.zeros((), dtype=torch.int64, device=device)
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)  # read by a captured step too
        self.weight = 1.0

    def set_step(self, step: int) -> None:
        """The number (from 1) of the step about to run, which a non-finite record names; no host synchronization."""
        self.step_t.fill_(step)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.ctx.enabled:
            distributed.reduce_gradients(self.params, self.weight, ())
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        # the largest entry is finite iff every entry is (the 2-norm overflows float32 for finite entries)
        self._record(self.bad_grad, torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
        if self.clip_norm is not None:
            clip_grad_norm_(self.params, self.clip_norm)

    def _record(self, flag: torch.Tensor, value: torch.Tensor) -> None:
        flag.copy_(torch.where((flag == 0) & ~torch.isfinite(value).to(flag.device), self.step_t, flag))

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record the step's ``loss`` if it is the first non-finite one, on the device."""
        self._record(self.bad_loss, loss.detach())

    def sync(self, stop: bool) -> bool:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss or gradient (on any
        rank); return whether any rank asked to stop."""
        bad_loss, bad_grad = int(self.bad_loss), int(self.bad_grad)
        if self.ctx.enabled:
            bad_loss, bad_grad, stop = reduce_flags(bad_loss, bad_grad, stop)
        if bad_loss or bad_grad:
            step = min(s for s in (bad_loss, bad_grad) if s)
            kind = " and ".join(k for k, s in (("loss", bad_loss), ("gradient", bad_grad)) if s == step)
            epoch = (step - 1) // self.steps_per_epoch + 1
            raise NonFiniteLossError(message(
                f"{kind} at epoch {epoch}, step {step}", "finite values", "NaN or infinite values",
                "lower the learning rate, clip the gradient (clip_norm / --clip-norm), check the data against "
                "the likelihood's support, or use a likelihood with a learned or larger scale" + self.kept()))
        return stop

    def kept(self) -> str:
        """What the run folder keeps, for an error message."""
        if self.ckpt_dir is None:
            return ""
        if has_checkpoint(self.ckpt_dir):
            return f"; the last good checkpoint in {self.ckpt_dir} is untouched (resume_from / --resume)"
        return f"; no checkpoint was written to {self.ckpt_dir} before it"


def reduce_flags(bad_loss: int, bad_grad: int, stop: bool) -> tuple[int, int, bool]:
    """Across ranks: the earliest bad step of each kind (0 = none) and whether any rank asked to stop."""
    big = 2 ** 62
    t = torch.tensor([bad_loss or big, bad_grad or big, 0 if stop else 1], dtype=torch.int64,
                     device=distributed.comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    lo, gr, go = t.tolist()
    return (0 if lo == big else lo), (0 if gr == big else gr), go == 0


def check_finite_record(record: dict[str, Any], guard: StepGuard) -> None:
    """An epoch's ELBOs must be finite: a NaN or infinite one (e.g. validation data the likelihood cannot
    score) stops training before the epoch's checkpoint, and best-model selection never goes silent."""
    names = {"val_elbo": "validation ELBO", "train_elbo": "training ELBO"}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            what = names.get(key, key.replace("_", " "))
            fix = ("check val_data: every value finite and of a size the likelihood can score (a huge value "
                   "gives an infinite log-density), or use a likelihood with a learned or larger scale"
                   if key.startswith("val") else "lower the learning rate or clip the gradient (clip_norm)")
            raise NonFiniteLossError(message(f"{what} at epoch {record['epoch']}", "a finite value", repr(value),
                                             fix + guard.kept()))
