"""A training run's checkpoints: the run folder that :func:`~pyro_vae.train.loop.fit` locks for the whole call,
and the :class:`Checkpointer` that writes ``checkpoint.pt`` (with ``best.pt`` and ``best.json`` when the score
improves) into it, restores a run from one, and words the error of a run stopped by a signal. The files, their
checksums and their atomic commit are :mod:`pyro_vae.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pyro
import torch

from pyro_vae import checkpoint as ckpt
from pyro_vae.errors import CheckpointError, TrainingInterrupted, message
from pyro_vae.infer.pair import ModelGuidePair
from pyro_vae.models.vae import VAE
from pyro_vae.train import distributed
from pyro_vae.train.callbacks import History, TrainState
from pyro_vae.train.cuda_graph import set_capturable
from pyro_vae.train.params import pyro_param_values, set_pyro_param_values
from pyro_vae.version import __version__

__all__ = ["holding_run_folders", "open_run_folder", "Checkpointer", "ResumePoint"]

F = TypeVar("F", bound=Callable[..., Any])

_RUN_FOLDERS: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("pyro_vae_run_folders")


def holding_run_folders(fn: F) -> F:
    """Whatever run-folder lock ``fn`` takes (:func:`open_run_folder`) is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _RUN_FOLDERS.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _RUN_FOLDERS.reset(token)

    return cast(F, wrapper)


def _lock_run_folder(folder: Path, resume_from: Any, overwrite: bool) -> None:
    """Lock ``folder`` until the call :func:`holding_run_folders` wraps ends; a new run refuses a folder training
    already wrote."""
    here = os.path.realpath(folder)
    resume = resume_from is not None and here in (os.path.realpath(resume_from),
                                                  os.path.dirname(os.path.realpath(resume_from)))
    _RUN_FOLDERS.get().enter_context(ckpt.open_run(folder, resume=resume, overwrite=overwrite))


def open_run_folder(checkpoint_dir: str | Path | None, resume_from: str | Path | None, overwrite: bool,
                    vae: torch.nn.Module) -> tuple[Path | None, str | Path | None]:
    """The run folder and what to resume from, on every rank (rank 0 checks the disk).

    The folder (``None`` without ``checkpoint_dir``) is checked writable, with room for the checkpoints of
    ``vae``, and locked until the call that :func:`holding_run_folders` wraps ends. ``resume_from`` comes back
    unchanged, or ``None`` for the folder of a run that stopped before its first checkpoint (with a warning:
    training starts from step 0). Called by :func:`~pyro_vae.train.loop.fit` itself: the warning points at
    fit's caller.

    Raises:
        CheckpointError: ``resume_from`` does not exist; the folder holds a run and neither ``resume_from`` it nor
            ``overwrite`` was given, or another run holds its lock.
        ConfigError: the folder cannot be created or written, or has too little free space.
    """
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume_from is not None and distributed.rank0_call(
            functools.partial(ckpt.started_without_checkpoint, resume_from)):
        warnings.warn(f"resume_from {resume_from}: the run stopped before its first checkpoint, so there is "
                      "nothing to continue; training starts from step 0",
                      stacklevel=4)  # this function, fit, holding_run_folders' wrapper, fit's caller
        resume_from = None
    if folder is not None:
        size = sum(t.numel() * t.element_size() for t in vae.state_dict().values())
        distributed.rank0_call(functools.partial(ckpt.check_writable, folder, 9 * size + 2 ** 20))
        distributed.rank0_call(functools.partial(_lock_run_folder, folder, resume_from, overwrite))
    return folder, resume_from


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: the first ``epoch``, its first minibatch ``batch`` (counted from 0), and
    ``totals``, the losses ``[objective, ELBO]`` (nats, summed over the data) of that epoch's earlier minibatches."""

    epoch: int = 1
    batch: int = 0
    totals: tuple[float, ...] = (0.0, 0.0)


class Checkpointer:
    """Writes a run's checkpoints into its folder and restores a run from one.

    It owns what a checkpoint holds beyond the state of ``state``'s VAE, optimizer and history: the best score so
    far (the validation ELBO, or the training ELBO without validation data), the training ``signature`` that a
    resumed run must match, the seed of the epochs' shuffles, the parameters of the ELBO's own modules
    (``extra``, e.g. a neural baseline) and the values of the ``pyro.param`` sites named in ``user_params``.

    Every rank calls :meth:`save` (each rank's random states and ``pyro.param`` values are gathered); rank 0
    writes, when there is a ``folder``.
    """

    def __init__(self, folder: Path | None, signature: dict[str, Any], state: TrainState,
                 extra: Sequence[torch.nn.Module], user_params: Sequence[str], shuffle_seed: int,
                 ctx: distributed.Context) -> None:
        self.folder, self.signature, self.state, self.ctx = folder, signature, state, ctx
        self.vae: VAE | ModelGuidePair = state.vae
        self.optimizer: torch.optim.Optimizer = state.optimizer
        self.history: History = state.history
        self.extra, self.user_params = list(extra), list(user_params)
        self.vae_config = self.vae.config if isinstance(self.vae, VAE) else None  # a pair: its state dict
        self.shuffle_seed = shuffle_seed
        self.best = -math.inf

    def save(self, epoch: int, batch: int, complete: bool, totals: list[float],
             record: dict[str, Any] | None = None) -> None:
        """Checkpoint the run after its first ``batch`` minibatches of ``epoch`` (``complete``: at the epoch's end,
        with its :class:`History` ``record``, whose score may be the best so far); ``totals``: that epoch's summed
        losses ``[objective, ELBO]`` so far. ``checkpoint.pt`` and, for a new best score, ``best.pt`` and
        ``best.json`` are committed as one unit."""
        ranks = distributed.all_gather_object((ckpt.rng_state(), pyro_param_values(self.user_params)))
        score = None if record is None else (record["val_elbo"] if record["val_elbo"] is not None
                                             else record["train_elbo"])
        is_best = False
        if score is not None and score > self.best:
            self.best, is_best = score, True
        if not self.ctx.is_main or self.folder is None:
            return
        files = {ckpt.CHECKPOINT: ckpt.tensor_bytes(self._payload(epoch, batch, complete, totals, ranks))}
        if is_best:  # one commit: best.pt never lags behind the best score checkpoint.pt records
            files[ckpt.BEST] = files[ckpt.CHECKPOINT]
            files[ckpt.BEST_JSON] = ckpt.json_bytes({"epoch": epoch, "step": self.state.step, "elbo": score})
        ckpt.RunFolder(self.folder).commit(files)

    def _payload(self, epoch: int, batch: int, complete: bool, totals: list[float],
                 ranks: list[Any]) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "version": __version__, "signature": self.signature,
            "vae_config": json.dumps(self.vae_config) if self.vae_config is not None else None,
            "vae": {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
            "extra_modules": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.extra],
            "optimizer": self.optimizer.state_dict(), "epoch": epoch, "batch": batch, "epoch_complete": complete,
            "step": self.state.step, "epoch_total": totals, "history": self.history.epochs, "best": self.best,
            "shuffle_seed": self.shuffle_seed, "world_size": self.ctx.world_size, "rng": [r for r, _ in ranks],
            "pyro_params": [p for _, p in ranks],
        }

    def resume(self, source: str | Path, capturable: bool) -> ResumePoint:
        """Restore the run that the checkpoint ``source`` (a ``checkpoint.pt`` or its folder) saved: weights,
        optimizer (made ``capturable`` or not, as this run needs), random states, history, step, best score
        and shuffle seed. Rank 0 reads and checks the file, every rank restores it. Called by
        :func:`~pyro_vae.train.loop.fit` itself: a warning points at fit's caller.

        Returns:
            Where training continues.

        Raises:
            CheckpointError: ``source`` is missing, damaged, or from another configuration.
        """
        payload = distributed.rank0_call(functools.partial(ckpt.load_training_state, source,
                                                           vae_config=self.vae_config, signature=self.signature))
        _restore(payload, self.vae, self.optimizer, self.ctx, source, self.extra)
        set_capturable(self.optimizer, capturable)
        self.history.epochs = list(payload["history"])
        self.best, self.state.step, self.shuffle_seed = payload["best"], payload["step"], payload["shuffle_seed"]
        if payload["epoch_complete"]:
            return ResumePoint(payload["epoch"] + 1)
        return ResumePoint(payload["epoch"], payload["batch"], _epoch_totals(payload["epoch_total"]))

    def interrupted(self, signal_name: str, epoch: int) -> TrainingInterrupted:
        """The error that ends a run stopped by the signal ``signal_name`` ("" when unknown) during ``epoch``,
        after :meth:`save`: it names the checkpoint and how to resume."""
        where = f"training stopped by {signal_name or 'a signal'} at epoch {epoch}, step {self.state.step}"
        if self.folder is None:
            return TrainingInterrupted(f"{where}; no checkpoint_dir was given, so nothing was saved (the VAE "
                                       "holds the parameters of that step)", None, epoch, self.state.step)
        path = self.folder / ckpt.CHECKPOINT
        return TrainingInterrupted(f"{where}; checkpoint written to {path}. Resume with the same options and "
                                   f"fit(..., resume_from={str(self.folder)!r}) or `pyro-vae train ... --resume`",
                                   str(path), epoch, self.state.step)


def _epoch_totals(saved: Any) -> tuple[float, ...]:
    """A checkpoint's partial-epoch sums ``[objective loss, ELBO loss]`` (one number in older checkpoints,
    written when the two were the same)."""
    return (float(saved), float(saved)) if isinstance(saved, (int, float)) else tuple(float(v) for v in saved)


def _restore(payload: dict[str, Any], vae: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: distributed.Context,
             source: str | Path, extra: Sequence[torch.nn.Module] = ()) -> None:
    try:
        vae.load_state_dict(payload["vae"])
        for module, sd in zip(extra, payload.get("extra_modules", []), strict=False):
            module.load_state_dict(sd)
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(message(f"checkpoint {source}", "weights and optimizer state of this VAE",
                                      f"a mismatch ({first})",
                                      "resume with the VAE configuration of the original run")) from None
    rngs = payload.get("rng") or []
    if len(rngs) == ctx.world_size:
        ckpt.set_rng_state(rngs[ctx.rank])
        set_pyro_param_values((payload.get("pyro_params") or [{}] * ctx.world_size)[ctx.rank])
    else:
        warnings.warn(f"checkpoint {source} was written by {len(rngs)} process(es), this run has "
                      f"{ctx.world_size}: the random streams are reseeded, so the run continues correctly but not "
                      "bit for bit as the original would have",
                      stacklevel=5)  # this function, Checkpointer.resume, fit, its wrapper, fit's caller
        pyro.set_rng_seed((int(payload["shuffle_seed"]) * 1_000_003 + int(payload["step"])) % 2 ** 31 + ctx.rank)
