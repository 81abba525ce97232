"""Training: minibatch stochastic variational inference over the VAE's model and guide, or over any Pyro
model/guide pair (:class:`pyro_vae.ModelGuidePair`: the parameters the traces touch are trained).

:func:`fit` trains by :func:`~pyro_vae.train.step.svi_step` on every minibatch: Pyro's ELBO on the model and
guide traces (through :func:`pyro_vae.infer.elbo_loss`, or Pyro's own ``loss_and_grads`` for an ELBO that
function does not handle), backward, and one step of a ``torch.optim.Adam`` over the VAE's parameters, those of
the ELBO's own modules (a neural baseline) and the ``pyro.param`` sites of the user's parts. One torch
optimizer, rather than Pyro's per-parameter wrappers, is what lets its state go into one checkpoint. With
``cuda_graph=True`` that step is recorded once and replayed (:class:`~pyro_vae.train.cuda_graph.CUDAGraphStep`).

The optimizer's step pre-hook, a :class:`~pyro_vae.train.guards.StepGuard`, runs before every update. Under a
``torch.distributed`` process group it sums the ranks' weighted gradients in one all-reduce
(:func:`pyro_vae.train.distributed.reduce_gradients`) and, with ``clip_norm``, clips the sum (one process
clips in the step itself); in every run it records on the device the first step whose loss or gradient is not
finite. The host reads those records, a stop request (SIGINT, SIGTERM) and the progress bar every
:data:`SYNC_EVERY` steps, at a checkpoint and at each epoch's end; the steps in between queue their work on the
device without waiting for it. Checkpoints, resume and the run folder's lock: :mod:`pyro_vae.train.checkpointing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from pyro_vae.data import as_tensor_data, check_binarizable
from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.infer.elbo import BOUNDS, check_num_particles, evaluate_elbo, make_elbo, reporting_elbo
from pyro_vae.infer.estimators import check_discrete_objective, check_estimator, default_estimator
from pyro_vae.infer.kl import kl_report
from pyro_vae.infer.losses import elbo_loss
from pyro_vae.infer.pair import ModelGuidePair, as_data_rows, as_pair, pair_structure
from pyro_vae.models.context import check_context, context_rows, declared_shapes, is_per_point
from pyro_vae.models.vae import VAE, kl_weighted_vaes, unit_kl_weight
from pyro_vae.schedules import Schedule
from pyro_vae.train import distributed
from pyro_vae.train.callbacks import History, TrainState
from pyro_vae.train.checkpointing import Checkpointer, ResumePoint, holding_run_folders, open_run_folder
from pyro_vae.train.cuda_graph import CUDAGraphStep, check_cuda_graph
from pyro_vae.train.guards import StepGuard, StopOnSignal, check_finite_record
from pyro_vae.train.params import check_no_new_params, collect_user_params
from pyro_vae.train.step import svi_step
from pyro_vae.validation import boolean, check_memory, integer, positive, resolve_device

__all__ = ["fit", "SYNC_EVERY"]

SYNC_EVERY = 20
"""Steps between host synchronizations: the non-finite check, the progress bar and, in distributed runs, the
agreement on a stop request. Steps in between queue their work on the device without waiting for it."""


@holding_run_folders
def fit(
    vae: VAE | ModelGuidePair | Any,
    train_data: Any,
    *,
    elbo: str | ELBO = "trace",
    num_particles: int | None = None,
    estimator: str | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_data: Any = None,
    context: Mapping[str, Any] | None = None,
    val_context: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    seed: int | None = 0,
    callbacks: Sequence[Any] = (),
    dynamic_binarize: bool = False,
    clip_norm: float | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    cuda_graph: bool = False,
    overwrite: bool = False,
) -> History:
    """Train ``vae`` by minibatch SVI with Adam.

    ``vae`` may also be any Pyro model/guide pair: a :class:`pyro_vae.ModelGuidePair` (or an object with methods
    ``model(x, num_data=None)`` and ``guide(x, num_data=None)``, taken as one by
    :func:`pyro_vae.infer.pair.as_pair`) whose model runs its per-data-point sites in a data plate subsampled
    from ``num_data`` (a VAE's ``vae.model(x, num_data=num_data)`` inside your model does this). Each step then
    is ``pyro.infer.SVI``'s on the minibatch: the sites inside the data plate scaled by ``num_data / batch``, the
    global latents outside it not scaled, and every parameter the model and guide traces touch trained by one
    Adam (``pyro.param`` sites, ``pyro.module`` s, autoguide parameters) and saved in the checkpoints. ``x`` is
    ``train_data``'s rows, cast to floating point and checked finite; a VAE's other checks (the likelihood's
    support, memory) are the model's own under Pyro's validation. Refused for a pair, as a VAE's alone:
    ``dynamic_binarize``, ``cuda_graph``, the KL-weight and temperature schedules of
    :mod:`pyro_vae.schedules` (set ``beta`` on the VAE inside your model instead) and the categorical-latent
    estimators' check; ``device="auto"`` is the device of the pair's ``modules`` (the CPU without any). The
    History's ELBOs are then the data set's ELBO divided by ``N`` (the global latents' KL counted once), estimated
    from each minibatch scaled to the data set, as :func:`pyro_vae.evaluate_elbo` of a pair reports it.

    Runs as one process, or data-parallel under an initialized ``torch.distributed`` process group (see
    :mod:`pyro_vae.train.distributed`): ``batch_size`` is then the global batch, shared out among the ranks.

    Args:
        vae: the VAE or model/guide pair to train (moved to ``device``).
        train_data: ``(N, *data_shape)`` tensor or :class:`pyro_vae.data.Dataset`, of any real dtype
            (floating point, integer or bool: cast to the dtype of the VAE's parameters, values unchanged);
            for a model/guide pair ``(N, ...)``, minibatched along the first dimension.
        elbo: ``"trace"``, ``"meanfield"``, ``"iwae"`` (the importance-weighted bound of Burda et al. 2016 with
            ``num_particles`` importance samples per data point, :mod:`pyro_vae.infer.iwae`) or any
            ``pyro.infer.ELBO``. Under ``"iwae"``, or an ELBO object whose value is not the ELBO
            (:func:`pyro_vae.infer.elbo.is_elbo`: an ``ImportanceWeightedELBO``, Pyro's ``RenyiELBO``, or any class
            not in :data:`pyro_vae.infer.elbo.ELBO_CLASSES`, a subclass included), the History's
            ``train_objective`` is that objective and ``train_elbo`` / ``val_elbo`` stay the ELBO (a second,
            one-particle ``Trace_ELBO`` evaluation of each minibatch before its step, at the same parameters,
            without gradients, and of the validation data).
        num_particles: Monte Carlo particles per step (vectorized); ``K`` for ``"iwae"``, which must be given
            (``K = 1`` is the ELBO; ``pyro-vae train --objective iwae`` uses 50). ``None`` (the default): 1 for
            ``"trace"`` and ``"meanfield"``; an ELBO object's own, and another value with an ELBO object is
            refused (:func:`pyro_vae.infer.elbo.check_num_particles`).
        estimator: gradient estimator, a name of :data:`pyro_vae.infer.estimators.ESTIMATORS` (``"pathwise"``,
            ``"score-function"``, ``"score-function-baseline"``, ``"straight-through"``, ``"stl"`` for the
            ELBO, ``"dreg"`` for ``"iwae"``, ...). ``None`` (the default) picks one before training by
            :func:`pyro_vae.infer.estimators.default_estimator`: ``"pathwise"`` for reparameterizable latents
            (Gaussian, relaxed categorical, relaxed Bernoulli), ``"score-function"`` for an exact discrete latent
            (``VAE(latent="bernoulli")``, or a model/guide pair whose guide has a latent site without ``rsample``)
            under the ELBO and ``"vimco"`` (Mnih & Rezende 2016; ``num_particles`` >= 2) for one under
            ``elbo="iwae"``, the one estimator of the IWAE bound for such a site;
            the checkpoints record the name picked. ``"pathwise"`` at a guide site without ``rsample`` is refused
            (:class:`ConfigError` naming the site), and so is ``elbo="meanfield"`` for an exact Bernoulli latent
            with an estimator that is not per site (pass ``"trace"``, or ``"rloo"``, ``"arm"``, ``"disarm"``...).
        epochs, batch_size, lr: the usual (``batch_size`` over all processes together).
        val_data: optional validation data; its ELBO is recorded every epoch.
        context: named context of the training data, passed to the model and guide as keyword arguments
            (``vae.model(xb, num_data=N, **context)``, see :meth:`pyro_vae.VAE.model`): ``{"y": y}`` with ``y``
            ``(N, ...)``, one row per data point, for a VAE built with ``encoder_context`` /
            ``decoder_context``, or global values (a number, a tensor without the data dimension) for a prior or
            likelihood that takes them. A tensor whose first dimension is ``N`` is per data point
            (:func:`pyro_vae.models.context.is_per_point`): every minibatch gets its rows, shuffled, sharded
            among the ranks and indexed exactly as the data's; every other value is passed whole. Context is data,
            not state: checkpoints do not hold it, and a resumed run takes it again.
        val_context: the validation data's context (its per-data-point values one row per point of
            ``val_data``); by default the global values of ``context``. Refused without ``val_data``; a
            per-data-point name of ``context`` missing from it is an error.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
        seed: seeds Pyro, torch, numpy and Python (rank ``r`` uses ``seed + r``) and the epochs' shuffles
            (``seed + epoch``, as ``DistributedSampler``); ``None`` leaves the RNGs alone.
        callbacks: objects with optional ``on_step(state)`` / ``on_epoch_end(state)`` (:class:`TrainState`),
            and ``on_fit_start(state)`` before the first step (the schedules of :mod:`pyro_vae.schedules`).
            Under ``TraceMeanField_ELBO``, which latent sites get an analytic KL is logged once at the start
            (logger ``"pyro_vae"``, and above the progress bar).
        dynamic_binarize: resample binary data from the grey levels every batch (Burda et al. 2016); the
            grey levels must lie in [0, 1] (they are not clamped).
        clip_norm: clip the gradient's global norm to this value.
        progress: show a tqdm progress bar with the running ELBO.
        checkpoint_dir: the run folder: ``checkpoint.pt`` (the last state: weights, optimizer, RNGs, epoch, step,
            history) at every epoch end, every ``checkpoint_every`` steps and on SIGINT/SIGTERM, and
            ``best.pt`` + ``best.json`` (best validation ELBO, or training ELBO without validation data),
            committed as one unit with their checksums (:mod:`pyro_vae.checkpoint`), rank 0 only. Created
            after every argument is checked and locked for the run (a second run into it is refused); a
            folder that training already wrote is refused unless ``resume_from`` it or ``overwrite``, and so is an
            existing folder holding files that are not a run's (nothing is written into it then).
        checkpoint_every: also checkpoint every this many optimizer steps.
        resume_from: a ``checkpoint.pt`` (or the folder holding one) to continue from; with the same
            configuration and seed, the result is bit for bit that of an uninterrupted run on the same device
            (statistically the same, not bit for bit, with ``cuda_graph=True``). The folder of a run stopped
            before its first checkpoint starts from step 0 (with a warning).
        cuda_graph: on a CUDA device, record the training step as a CUDA graph after four eager steps and
            replay it for every full minibatch (:class:`pyro_vae.train.CUDAGraphStep`), which removes Pyro's
            per-step Python cost. For a Gaussian latent under ``"trace"`` or ``"meanfield"`` with the
            pathwise estimator, in one process; callbacks must not change what the model or guide read from
            Python (KL-weight and temperature schedules are refused; a changed learning rate re-records the
            step). Same objective and gradients as the eager step, with other random numbers.
        overwrite: replace the run in ``checkpoint_dir`` (its files are removed once training starts), or write
            into a folder of other files (those with the names of a run's files are replaced, the others kept).

    Returns:
        :class:`History` of per-epoch train and validation ELBOs and the training objective (nats per data
        point; the ELBO is always the one with KL weight 1, see :class:`History`).

    Raises:
        ConfigError: an argument out of range (checked before any work), ``elbo="iwae"`` without
            ``num_particles``, an ELBO object with a ``num_particles`` other than its own, a ``context`` that is
            not a dict of names or that lacks a value the encoder or decoder takes (the VAE's error, naming the names),
            ``cuda_graph`` with context, ``val_context`` without ``val_data`` or without a per-data-point name
            of ``context``, a VAE too large for the device, a
            model/guide pair without a data plate over the minibatch or with an option only a VAE has, or
            ``epochs`` below the epochs the checkpoint ``resume_from`` already trained (with as many, nothing is
            trained and the restored history comes back).
        DataError: data of the wrong shape or dtype, non-finite, outside the likelihood's support, or (with
            ``dynamic_binarize``) outside [0, 1]; a per-data-point context value (of a name the encoder or
            decoder takes) whose first dimension is not the data's ``N``
            (:func:`pyro_vae.models.context.check_context`).
        ModelError: a part of the VAE returned NaN parameters or no distribution (at the first, validated step);
            a guide that opens a plate twice (an autoguide re-creating a plate of the guide: the message names
            the recipe that works, :data:`pyro_vae.infer.pair.AUTOGUIDE_PLATE_RECIPE`).
        NonFiniteLossError: a loss or gradient, or an epoch's training or validation ELBO, turned NaN or
            infinite (the message gives epoch and step; no checkpoint is written after it).
        CheckpointError: ``checkpoint_dir`` holds a run or other files (without ``resume_from``/``overwrite``)
            or is locked by another run; ``resume_from`` is missing, damaged or from another configuration.
        TrainingInterrupted: SIGINT or SIGTERM arrived; a checkpoint was written first when ``checkpoint_dir``
            is set.
    """
    vae = as_pair(vae)
    cfg = _fit_config(vae, callbacks, elbo=elbo, num_particles=num_particles, estimator=estimator, epochs=epochs,
                      batch_size=batch_size, lr=lr, device=device, seed=seed, dynamic_binarize=dynamic_binarize,
                      clip_norm=clip_norm, progress=progress, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, resume_from=resume_from, cuda_graph=cuda_graph,
                      overwrite=overwrite)
    run = _prepare(vae, train_data, val_data, cfg, context, val_context)
    cfg = dataclasses.replace(cfg, estimator=run.estimator)
    folder, resume_from = open_run_folder(cfg.checkpoint_dir, cfg.resume_from, cfg.overwrite, vae)
    history = History()
    state = TrainState(vae=vae, optimizer=run.optimizer, history=history)
    checkpointer = Checkpointer(folder, cfg.signature(run.num_data), state, run.extra, list(run.user_params),
                                _shuffle_seed(cfg), cfg.ctx)
    start = checkpointer.resume(resume_from, cfg.cuda_graph) if resume_from is not None else ResumePoint()
    _check_epochs_left(cfg.epochs, start, resume_from)
    guard = StepGuard(run.params, cfg.device, cfg.ctx, cfg.clip_norm if cfg.ctx.enabled else None,
                      run.steps_per_epoch, folder)
    hook = run.optimizer.register_step_pre_hook(guard)
    graph_step = CUDAGraphStep(run.loss_fn, vae, run.x[: min(cfg.batch_size, run.num_data)], run.num_data,
                               run.optimizer, run.params, cfg.clip_norm) if cfg.cuda_graph else None
    bar = _progress_bar(cfg, cfg.epochs * run.steps_per_epoch, state.step)
    _fit_start(state, callbacks, run.loss_fn, run.x[:2], bar if cfg.ctx.is_main else False, cfg.dynamic_binarize,
               context_rows(run.context, run.num_data, slice(0, 2)))
    first_step = state.step
    vae.train()
    try:
        with StopOnSignal() as stopper:
            loop = _Loop(cfg, run, state, guard, graph_step, checkpointer, stopper, bar, callbacks, first_step)
            for epoch in range(start.epoch, cfg.epochs + 1):
                state.epoch = epoch
                started = time.perf_counter()
                totals = _run_epoch(loop, epoch, start)
                record = _epoch_record(loop, epoch, totals, started)
                check_no_new_params(run.user_params, run.params_in_store)
                history.epochs.append(record)
                checkpointer.save(epoch, run.steps_per_epoch, True, [0.0, 0.0], record)
                _call(callbacks, "on_epoch_end", state)
                if guard.sync(stopper.requested):
                    raise checkpointer.interrupted(stopper.signal_name, epoch)
                if state.stop:
                    break
    finally:
        hook.remove()
        if bar is not None:
            bar.close()
        vae.eval()
    return history


def _check_epochs_left(epochs: int, start: ResumePoint, resume_from: str | Path | None) -> None:
    """Refuse ``epochs`` below what the checkpoint ``resume_from`` already trained (``start``): a resume continues
    a run, and its history would hold more epochs than asked for. Equal: nothing left to train."""
    least = start.epoch if start.batch > 0 else start.epoch - 1
    if epochs < least:
        trained = f"{start.epoch - 1} epochs" + (f" and part of epoch {start.epoch}" if start.batch > 0 else "")
        raise ConfigError(message("epochs", f"at least {least} (the checkpoint {resume_from} already trained "
                                  f"{trained}; resuming cannot shorten a run)", repr(epochs),
                                  f"pass epochs={least} or more, or train a new run without resume_from"))


@dataclass(frozen=True)
class FitConfig:
    """:func:`fit`'s arguments, checked before any work and normalized to plain Python values (they go into
    checkpoints), with the resolved ``device`` and the process group's ``ctx``."""

    epochs: int
    batch_size: int
    lr: float
    clip_norm: float | None
    checkpoint_every: int | None
    num_particles: int
    dynamic_binarize: bool
    progress: bool
    cuda_graph: bool
    overwrite: bool
    elbo: str | ELBO
    estimator: str | None  # None only for a model/guide pair before _prepare resolves it
    seed: int | None
    device: torch.device
    ctx: distributed.Context
    checkpoint_dir: str | Path | None
    resume_from: str | Path | None

    def signature(self, num_data: int) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes from it."""
        return {"num_data": num_data, "batch_size": self.batch_size, "lr": self.lr, "clip_norm": self.clip_norm,
                "elbo": self.elbo if isinstance(self.elbo, str) else type(self.elbo).__name__,
                "num_particles": self.num_particles, "estimator": self.estimator,
                "dynamic_binarize": self.dynamic_binarize, "seed": self.seed}


def _fit_config(vae: VAE | ModelGuidePair, callbacks: Sequence[Any], *, elbo: Any, num_particles: Any,
                estimator: Any, epochs: Any, batch_size: Any, lr: Any, device: Any, seed: Any,
                dynamic_binarize: Any, clip_norm: Any, progress: Any, checkpoint_dir: Any, checkpoint_every: Any,
                resume_from: Any, cuda_graph: Any, overwrite: Any) -> FitConfig:
    """Check :func:`fit`'s arguments (the first bad one raises :class:`ConfigError`), before any work."""
    epochs = integer("epochs", epochs, 1)
    batch_size = integer("batch_size", batch_size, 1)
    lr = positive("lr", lr)
    if lr > torch.finfo(torch.float32).max:  # Adam's update cannot hold it
        raise ConfigError(message("lr", "a learning rate float32 can hold (<= 3.4e38)", f"{lr:g}",
                                  "pass a learning rate such as lr=1e-3"))
    if clip_norm is not None:
        clip_norm = positive("clip_norm", clip_norm)
    if checkpoint_every is not None:
        checkpoint_every = integer("checkpoint_every", checkpoint_every, 1)
    num_particles = check_num_particles(elbo, num_particles)
    dynamic_binarize, progress, cuda_graph, overwrite = (boolean(name, value) for name, value in (
        ("dynamic_binarize", dynamic_binarize), ("progress", progress), ("cuda_graph", cuda_graph),
        ("overwrite", overwrite)))
    elbo, estimator = (str(v) if isinstance(v, str) else v for v in (elbo, estimator))
    if estimator is None and isinstance(vae, VAE):
        estimator = default_estimator(vae, elbo=elbo)  # a model/guide pair's is read off its guide's trace (_prepare)
    ctx = distributed.context()
    if seed is not None:
        seed = integer("seed", seed, 0, 2 ** 32 - ctx.world_size)  # numpy's seeds stop at 2**32 - 1
    if batch_size < ctx.world_size:
        raise ConfigError(message("batch_size", f"at least the number of processes ({ctx.world_size}); it is the "
                                  "global batch", repr(batch_size), f"pass batch_size >= {ctx.world_size}"))
    if isinstance(vae, ModelGuidePair):
        _check_pair_options(vae, callbacks, dynamic_binarize, cuda_graph)
        if isinstance(device, str) and device == "auto":
            device = next((t.device for t in (*vae.parameters(), *vae.buffers())), torch.device("cpu"))
    dev = resolve_device(device)
    if cuda_graph and isinstance(vae, VAE):
        check_cuda_graph(vae, dev, ctx, estimator, BOUNDS[elbo]() if isinstance(elbo, str) and elbo in BOUNDS
                         else elbo, callbacks)
    return FitConfig(epochs, batch_size, lr, clip_norm, checkpoint_every, num_particles, dynamic_binarize, progress,
                     cuda_graph, overwrite, elbo, estimator, seed, dev, ctx, checkpoint_dir, resume_from)


def _check_pair_options(pair: ModelGuidePair, callbacks: Sequence[Any], dynamic_binarize: bool,
                        cuda_graph: bool) -> None:
    """Refuse for a model/guide pair what :func:`fit` does for a VAE alone."""
    def refuse(what: str, found: str, fix: str) -> ConfigError:
        return ConfigError(message(what, "an option a model/guide pair supports (it is not a pyro_vae.VAE)", found,
                                   fix))
    if dynamic_binarize:
        raise refuse("dynamic_binarize", "True", "binarize the data yourself (pyro_vae.data.binarize) and pass "
                     "dynamic_binarize=False, or train the VAE alone")
    if cuda_graph:
        raise refuse("cuda_graph", "True", "pass cuda_graph=False (the graph is recorded for a VAE's step only)")
    for cb in callbacks:
        if isinstance(cb, Schedule):
            raise refuse("callbacks", f"a {type(cb).__name__} schedule (it sets the KL weight or temperature of "
                         "the VAE fit trains)", "set vae.beta / vae.temperature of the VAE inside your model from "
                         "a callback of your own, or train the VAE alone")


@dataclass(frozen=True)
class _Training:
    """What :func:`_prepare` builds: the data, the ELBO, the optimizer and the tensors it steps."""

    vae: VAE | ModelGuidePair
    x: torch.Tensor  # (num_data, *data_shape), on the device
    xv: torch.Tensor | None  # validation data, where it was given
    loss_fn: ELBO
    elbo_fn: ELBO  # the ELBO reported (loss_fn itself when its value is the ELBO, see reporting_elbo)
    extra: list[torch.nn.Module]  # the ELBO's own modules (a neural baseline)
    user_params: dict[str, torch.Tensor]  # pyro.param sites of the user's parts, by name
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # what the optimizer steps (and the guard checks and reduces)
    params_in_store: int
    steps_per_epoch: int
    context: dict[str, Any]  # the training data's named context, tensors on the device
    val_context: dict[str, Any]  # the validation data's
    estimator: str  # the estimator's name, resolved when fit's was None


    @property
    def num_data(self) -> int:
        return self.x.shape[0]


def _prepare(vae: VAE | ModelGuidePair, train_data: Any, val_data: Any, cfg: FitConfig,
             context: Mapping[str, Any] | None, val_context: Mapping[str, Any] | None) -> _Training:
    """Check the data, seed the random streams, build the ELBO and the optimizer, and move the VAE and the
    training data to the device (rank 0's initial values on every rank). A model/guide pair is traced once on
    the first minibatch (:func:`pyro_vae.infer.pair.pair_structure`): its data plate is checked and the ELBO
    gets its plate nesting. The named context is checked against the data (:func:`_checked_context`)."""
    if isinstance(vae, VAE):
        x, xv = _checked_data(vae, train_data, val_data, cfg)
    else:
        x, xv = _checked_pair_data(vae, train_data, val_data)
    ctx, val_ctx = _checked_context(vae, x, xv, context, val_context, cfg)
    if cfg.seed is not None:
        pyro.set_rng_seed(cfg.seed + cfg.ctx.rank)
    if isinstance(vae, VAE):
        check_estimator(cfg.estimator or default_estimator(vae, elbo=cfg.elbo), vae, cfg.elbo)
    vae.to(cfg.device)
    x = x.to(cfg.device)
    n = x.shape[0]
    first = context_rows(ctx, n, slice(0, min(cfg.batch_size, n)))
    if isinstance(vae, VAE):
        estimator = cfg.estimator or default_estimator(vae, elbo=cfg.elbo)
        loss_fn = make_elbo(cfg.elbo, cfg.num_particles, estimator, vae.data_shape)
    else:
        structure = pair_structure(vae, x[: min(cfg.batch_size, n)], n, context=first)
        estimator = cfg.estimator or default_estimator(vae, structure.non_reparameterized, cfg.elbo)
        for site in structure.non_reparameterized[:1]:  # an exact discrete site: fixes that apply to it
            check_discrete_objective(estimator, cfg.elbo, site, vae=False)
        loss_fn = make_elbo(cfg.elbo, cfg.num_particles, estimator, tuple(x.shape[1:]),
                            max_plate_nesting=structure.max_plate_nesting)
    distributed.broadcast_module(vae)
    extra = [m.to(cfg.device) for m in getattr(loss_fn, "extra_modules", list)()]  # e.g. a neural baseline
    for m in extra:
        distributed.broadcast_module(m)
    own = [*vae.parameters(), *(p for m in extra for p in m.parameters())]
    user_params = collect_user_params(loss_fn, vae, x[: min(cfg.batch_size, n)], n, own, cfg.dynamic_binarize,
                                      first)
    for p in user_params.values():
        distributed.broadcast_tensor(p)
    optimizer = torch.optim.Adam([*own, *user_params.values()], lr=cfg.lr, capturable=bool(cfg.cuda_graph))
    params_in_store = len(pyro.get_param_store())
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return _Training(vae, x, xv, loss_fn, reporting_elbo(loss_fn), extra, user_params, optimizer, params,
                     params_in_store, math.ceil(n / cfg.batch_size), ctx, val_ctx, estimator)


def _checked_context(vae: VAE | ModelGuidePair, x: torch.Tensor, xv: torch.Tensor | None,
                     context: Mapping[str, Any] | None, val_context: Mapping[str, Any] | None,
                     cfg: FitConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training and validation context (:func:`pyro_vae.models.context.check_context`), the training one on
    the device: the validation context defaults to the training context's global values, and must give every
    per-data-point name of the training context."""
    shapes = declared_shapes(vae)
    ctx = check_context("context", context, x.shape[0], shapes, cfg.device)
    if ctx and cfg.cuda_graph:
        raise ConfigError(message("cuda_graph", "no context (the recorded step replays its own input tensors)",
                                  f"context {sorted(ctx)}", "pass cuda_graph=False to train with context"))
    if xv is None:
        if val_context is not None:
            raise ConfigError(message("val_context", "val_data to go with it", "val_data=None",
                                      "pass val_data, or drop val_context"))
        return ctx, {}
    given = check_context("val_context", val_context, xv.shape[0], shapes)
    per_point = [k for k, v in ctx.items() if is_per_point(v, x.shape[0])]
    missing = [k for k in per_point if k not in given]
    if missing:
        raise ConfigError(message(
            "val_context", f"values for the per-data-point context names {per_point} (one row per point of "
            "val_data)", f"none for {missing}", f"pass val_context={{{missing[0]!r}: <its rows for val_data>}}"))
    return ctx, {**{k: v for k, v in ctx.items() if k not in per_point}, **given}


def _checked_pair_data(pair: ModelGuidePair, train_data: Any, val_data: Any) -> tuple[torch.Tensor,
                                                                                     torch.Tensor | None]:
    """A model/guide pair's training and validation data (:func:`pyro_vae.infer.pair.as_data_rows`), the
    validation rows shaped as the training rows."""
    x = as_data_rows(pair, train_data, "train_data")
    if val_data is None:
        return x, None
    xv = as_data_rows(pair, val_data, "val_data")
    if tuple(xv.shape[1:]) != tuple(x.shape[1:]):
        raise DataError(message("val_data", f"rows of train_data's shape {tuple(x.shape[1:])}",
                                f"rows of shape {tuple(xv.shape[1:])}", "pass validation data like the training data"))
    return x, xv


def _checked_data(vae: VAE, train_data: Any, val_data: Any, cfg: FitConfig) -> tuple[torch.Tensor,
                                                                                    torch.Tensor | None]:
    """The training and validation data as the VAE's tensors, checked whole (shape, dtype, finite values, the
    likelihood's support), and the training's memory checked against the device's."""
    x = vae.as_data(as_tensor_data(train_data, "train_data"), "train_data", data_set=True)
    xv = vae.as_data(as_tensor_data(val_data, "val_data"), "val_data", data_set=True) if val_data is not None else None
    if cfg.dynamic_binarize:  # grey levels are probabilities of a one: refused outside [0, 1], never clamped
        check_binarizable(x, "train_data (dynamic_binarize=True)")
    vae.check_data(x >= 0.5 if cfg.dynamic_binarize else x, "train_data", data_set=True)
    if xv is not None:
        vae.check_data(xv, "val_data", data_set=True)
    dev = cfg.device
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    check_memory("fit", 4 * weights + (x.numel() * x.element_size() if dev.type != "cpu" else 0), dev,
                 "use a smaller VAE", "weights, gradients and Adam's two moments" +
                 (", and the training data" if dev.type != "cpu" else ""))
    batch_bytes = min(cfg.batch_size, len(x)) * math.prod(vae.data_shape) * torch.finfo(torch.float32).bits // 8
    check_memory("num_particles", 3 * int(cfg.num_particles) * batch_bytes, dev,
                 "use fewer particles or a smaller batch_size",
                 f"{cfg.num_particles} particles' decoder outputs, log-densities and gradients")
    return x, xv


def _shuffle_seed(cfg: FitConfig) -> int:
    """The seed of the epochs' shuffles: ``seed``, or without one a draw from torch's random stream (rank 0's
    draw on every rank)."""
    return cfg.seed if cfg.seed is not None else distributed.broadcast_object(int(torch.randint(2 ** 31 - 1, ())))


def _progress_bar(cfg: FitConfig, total: int, initial: int) -> tqdm | None:
    """A tqdm bar over all the run's steps, on rank 0 when ``progress`` is on."""
    if not (cfg.progress and cfg.ctx.is_main):
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def _fit_start(state: TrainState, callbacks: Sequence[Any], loss_fn: ELBO, x: torch.Tensor, bar: Any,
               dynamic_binarize: bool, context: dict[str, Any]) -> None:
    """Call ``on_fit_start(state)`` of the callbacks that have it (schedules set their step-``state.step``
    value), and under ``TraceMeanField_ELBO`` log once which latent sites get an analytic KL."""
    _call(callbacks, "on_fit_start", state)
    if bar is False or not isinstance(loss_fn, TraceMeanField_ELBO):
        return
    dev = x.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # leave the training RNG alone
        state.vae.eval()
        report = str(kl_report(state.vae, torch.bernoulli(x) if dynamic_binarize else x, **context))
        state.vae.train()
    logging.getLogger("pyro_vae").info(report)
    if bar is not None:
        bar.write(report)


def _call(callbacks: Sequence[Any], hook: str, state: TrainState) -> None:
    """``callback.<hook>(state)`` for each callback that has the method, in order."""
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(state)


@dataclass(frozen=True)
class _Loop:
    """What the epochs of one :func:`fit` call step through and report to."""

    cfg: FitConfig
    run: _Training
    state: TrainState
    guard: StepGuard
    graph_step: CUDAGraphStep | None
    checkpointer: Checkpointer
    stopper: StopOnSignal
    bar: tqdm | None
    callbacks: Sequence[Any]
    first_step: int  # the step validated in full (the first of this call)


def _run_epoch(loop: _Loop, epoch: int, start: ResumePoint) -> list[float]:
    """Train the minibatches of ``epoch`` (from ``start.batch`` on when it is ``start.epoch``: a resumed epoch
    continues mid-way), checkpointing and stopping on request at the synchronization points. Returns the epoch's
    losses ``[objective, ELBO]`` summed over the data and the ranks, the sums ``start.totals`` of a resumed
    epoch's earlier minibatches included."""
    cfg, run, state, guard, stopper = loop.cfg, loop.run, loop.state, loop.guard, loop.stopper
    first, carried = (start.batch, start.totals) if epoch == start.epoch else (0, (0.0, 0.0))
    n, batch_size, ctx = run.num_data, cfg.batch_size, cfg.ctx
    total = torch.zeros(2, dtype=torch.float64, device=cfg.device)  # objective and ELBO losses
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(loop.checkpointer.shuffle_seed + epoch))
    perm = perm.to(cfg.device)
    shown = state.step
    for i in range(first, run.steps_per_epoch):
        idx = perm[i * batch_size: (i + 1) * batch_size]
        b = idx.numel()
        if ctx.enabled:
            idx = idx[ctx.rank:: ctx.world_size]
        guard.set_step(state.step + 1)
        guard.weight = idx.numel() / b
        loss, elbo_loss = _train_step(loop, idx)
        guard.note_loss(loss)
        state.step += 1
        state.loss = loss
        total += torch.stack([loss.detach(), elbo_loss.detach()]).to(total.dtype) * (idx.numel() / n)
        _call(loop.callbacks, "on_step", state)
        last = i == run.steps_per_epoch - 1
        ckpt_now = cfg.checkpoint_every is not None and state.step % cfg.checkpoint_every == 0 and not last
        if last or ckpt_now or state.step % SYNC_EVERY == 0 or (stopper.requested and not ctx.enabled):
            stop = guard.sync(stopper.requested)
            if loop.bar is not None:
                loop.bar.update(state.step - shown)
                shown = state.step
                loop.bar.set_postfix(epoch=epoch, elbo=f"{-float(elbo_loss) / n:.2f}")
            if stop or ckpt_now:
                loop.checkpointer.save(epoch, i + 1, False, _add(carried, _global_sum(total, ctx)))
            if stop:
                raise loop.checkpointer.interrupted(stopper.signal_name, epoch)
    return _add(carried, _global_sum(total, ctx))


def _train_step(loop: _Loop, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's rows ``idx`` of the training data. Returns the step's loss (the
    negative objective) and its negative ELBO (KL weight 1), both 0-dim tensors on the device, at the parameters
    the step's gradient was computed at (:func:`_elbo_before_step`). A rank whose share of a short last batch is
    empty returns zeros and steps with zero gradients, so that it still meets the others in the gradients'
    all-reduce."""
    cfg, run, state = loop.cfg, loop.run, loop.state
    if idx.numel() == 0:
        for p in run.params:
            p.grad = torch.zeros_like(p)
        run.optimizer.step()
        zero = torch.zeros((), device=cfg.device)
        return zero, zero
    xb = run.x[idx]
    rows = context_rows(run.context, run.num_data, idx)  # the same rows as the data's
    if cfg.dynamic_binarize:
        xb = torch.bernoulli(xb)
    try:
        elbo = _elbo_before_step(run, xb, validate=state.step == loop.first_step, context=rows)
        if loop.graph_step is not None and state.step != loop.first_step:
            loss = loop.graph_step(xb).clone()  # a replay overwrites its loss tensor
        else:
            loss = torch.as_tensor(svi_step(
                run.loss_fn, run.vae, xb, run.num_data, run.optimizer, run.params,
                None if cfg.ctx.enabled else cfg.clip_norm,
                validate=None if state.step == loop.first_step else False, check_finite=False, context=rows))
    except Exception:
        if not cfg.ctx.enabled:
            loop.guard.sync(False)  # an earlier NaN explains this failure: report that instead
        raise
    return loss, loss if elbo is None else elbo


def _elbo_before_step(run: _Training, xb: torch.Tensor, validate: bool,
                      context: dict[str, Any]) -> torch.Tensor | None:
    """The negative ELBO (KL weight 1) of the minibatch ``xb`` at the parameters the coming step differentiates,
    or ``None`` when the step's own loss is that ELBO (KL weight 1 and an ELBO objective).

    It is evaluated without gradients (and, for ``Trace_ELBO`` / ``TraceMeanField_ELBO``, without a host
    synchronization) from the state of torch's random streams that the step then starts from: the state is saved
    and restored around it, so the step draws what this evaluation drew, and the training's random streams are
    those of a run that does not report the ELBO. Under a KL weight ``beta`` both evaluations of a minibatch
    therefore use the same latents, and the step's loss minus this one is ``(beta - 1)`` times the KL term of
    those draws (analytic where the mean-field ELBO has one, the Monte Carlo ``log q - log p`` otherwise). Under
    the importance-weighted bound this one-particle ELBO starts from the same state as the bound's ``K`` draws.
    ``validate``: Pyro's validation as the step has it (the global setting at the first step of a call, off
    after)."""
    vae, loss_fn = run.vae, run.elbo_fn
    if all(beta == 1.0 for beta in _betas(vae)) and loss_fn is run.loss_fn:
        return None
    dev = xb.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad(), \
            unit_kl_weight(vae), contextlib.nullcontext() if validate else pyro.validation_enabled(False):
        out = elbo_loss(loss_fn, vae.model, vae.guide, xb, num_data=run.num_data, **context)
        if out is None:
            # every Pyro ELBO defines loss; the ELBO base class does not declare it
            value = loss_fn.loss(vae.model, vae.guide, xb, num_data=run.num_data,  # type: ignore[attr-defined]
                                 **context)
            return torch.as_tensor(value, device=dev)
    return out[0]


def _epoch_record(loop: _Loop, epoch: int, totals: Sequence[float], started: float) -> dict[str, Any]:
    """The :class:`History` record of ``epoch`` from its summed losses ``totals`` ``[objective, ELBO]``, with
    the validation ELBO; a non-finite ELBO raises :class:`NonFiniteLossError`."""
    run, vae, n = loop.run, loop.run.vae, loop.run.num_data
    objective, elbo = totals
    record: dict[str, Any] = {"epoch": epoch, "step": loop.state.step, "train_elbo": -elbo / n,
                              "train_objective": -objective / n, "beta": _beta(vae), "val_elbo": None}
    if run.xv is not None:
        vae.eval()
        record["val_elbo"] = _val_elbo(vae, run.xv, run.elbo_fn, max(loop.cfg.batch_size, 512), loop.cfg.ctx,
                                       run.val_context)
        vae.train()
    check_finite_record(record, loop.guard)
    record["seconds"] = time.perf_counter() - started
    return record


def _global_sum(total: torch.Tensor, ctx: distributed.Context) -> list[float]:
    values = [float(t) for t in total]
    return distributed.all_reduce_sum(values, total.device) if ctx.enabled else values


def _add(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [float(u) + float(v) for u, v in zip(a, b, strict=False)]


def _betas(vae: Any) -> list[float]:
    """The KL weights of the VAE, or of the VAEs among a model/guide pair's modules and of every other live VAE
    with a weight other than 1 (the pair's own functions may call one it does not list; none: ``[1.0]``)."""
    if isinstance(vae, ModelGuidePair):
        seen = {id(m): m for m in (*(m for m in vae.modules() if isinstance(m, VAE)), *kl_weighted_vaes())}
        return [float(m.beta) for m in seen.values()] or [1.0]
    return [float(getattr(vae, "beta", 1.0))]


def _beta(vae: Any) -> float | None:
    """History's ``beta``: the KL weight, ``None`` for a pair whose VAEs have different ones."""
    betas = set(_betas(vae))
    return betas.pop() if len(betas) == 1 else None


def _val_elbo(vae: VAE | ModelGuidePair, xv: torch.Tensor, loss_fn: ELBO, batch_size: int,
              ctx: distributed.Context, context: dict[str, Any]) -> float:
    """Validation ELBO per data point; in distributed runs each rank evaluates its interleaved share (and its
    context's rows)."""
    if not ctx.enabled:
        return evaluate_elbo(vae, xv, elbo=loss_fn, batch_size=batch_size, context=context)
    share = xv[ctx.rank:: ctx.world_size]
    rows = context_rows(context, len(xv), slice(ctx.rank, None, ctx.world_size))
    part = evaluate_elbo(vae, share, elbo=loss_fn, batch_size=batch_size, context=rows) * len(share) \
        if len(share) else 0.0
    return distributed.all_reduce_sum([part], xv.device)[0] / len(xv)
