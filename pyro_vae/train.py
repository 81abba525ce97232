"""Training: minibatch stochastic variational inference over the VAE's model and guide.

:func:`fit` drives Pyro's own ``ELBO.loss_and_grads`` (the call ``SVI.step`` makes) and steps a
``torch.optim.Adam`` over ``vae.parameters()``. Holding a torch optimizer rather than Pyro's per-parameter
wrappers is what lets its state go into one checkpoint and lets the same loop run under
``DistributedDataParallel``; the objective is Pyro's, unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingInterrupted, message
from .step import CUDAGraphStep, _fast_kind, clip_grad_norm_, svi_step
from .vae import VAE, unit_kl_weight
from .validation import check_memory, integer, number, positive

__all__ = ["fit", "EarlyStopping", "make_elbo", "evaluate_elbo", "History", "TrainState", "resolve_device", "as_tensor_data",
           "ELBOS"]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def make_elbo(elbo: Union[str, ELBO] = "trace", num_particles: int = 1, estimator: str = "pathwise",
              data_shape: Optional[Sequence[int]] = None) -> ELBO:
    """``"trace"`` (``Trace_ELBO``, Monte Carlo KL) or ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KL
    where one is registered), with ``num_particles`` vectorized particles; an ELBO object is returned as is.
    Any ``estimator`` but ``"pathwise"`` gets the ELBO of :func:`pyro_vae.estimators.make_estimator_elbo`
    (``TraceGraph_ELBO`` for baselines; ``data_shape`` sizes a neural baseline)."""
    if isinstance(elbo, ELBO):
        if estimator != "pathwise":
            raise ConfigError(message("estimator", '"pathwise" when elbo is an ELBO object', repr(estimator),
                                      'pass elbo="trace" with the estimator name'))
        return elbo
    if estimator != "pathwise":
        from .estimators import make_estimator_elbo

        return make_estimator_elbo(estimator, elbo, num_particles, data_shape=data_shape)
    if elbo not in ELBOS:
        raise ConfigError(message("elbo", f"one of {sorted(ELBOS)} or a pyro.infer.ELBO", repr(elbo),
                                  "pick a known name"))
    num_particles = integer("num_particles", num_particles, 1)
    return ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(message("device", '"auto", "cpu", "cuda" or "cuda:N"', repr(device),
                                  "pass --device auto")) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(message("device", "a device this machine has", f"{device} without CUDA available",
                                  "pass --device cpu or auto"))
    return dev


def as_tensor_data(data: Any, what: str = "train_data") -> torch.Tensor:
    """The data tensor of a tensor or of a :class:`pyro_vae.data.Dataset` (anything with ``.x``)."""
    x = getattr(data, "x", data)
    if not torch.is_tensor(x):
        from .errors import DataError

        raise DataError(message(what, "a torch.Tensor or a pyro_vae.data.Dataset", type(data).__name__,
                                "convert with torch.as_tensor(array, dtype=torch.float32)"))
    return x


@dataclass
class History:
    """Per-epoch records ``{"epoch", "step", "train_elbo", "train_objective", "beta", "val_elbo", "seconds"}``,
    in nats per data point:

    - ``train_elbo``: the ELBO (KL weight 1), averaged over the epoch's minibatches as they were trained (one
      Monte Carlo estimate per minibatch, at the parameters of its step);
    - ``train_objective``: what the steps maximized, ``E_q[log p(x|z)] - beta KL``, the same way (equal to
      ``train_elbo`` when ``beta`` is 1; under a KL weight it is a second evaluation on the same minibatch);
    - ``beta``: the VAE's KL weight at the end of the epoch;
    - ``val_elbo``: the ELBO of the validation data at the epoch's end (``None`` without validation data).
      Best-model selection (``best.pt``) and :class:`EarlyStopping` use ``val_elbo`` (``train_elbo`` without
      validation data), never the objective."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, key: str) -> list[Any]:
        return [e[key] for e in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}


@dataclass
class TrainState:
    """What callbacks see: ``on_step(state)`` after every optimizer step, ``on_epoch_end(state)`` after
    every epoch (``state.stop = True`` ends training). ``loss`` is the last step's loss as a 0-dim tensor on
    the device (``float(state.loss)`` waits for it)."""

    vae: VAE
    optimizer: torch.optim.Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    loss: Any = math.nan
    stop: bool = False


def evaluate_elbo(vae: VAE, data: Any, *, elbo: Union[str, ELBO] = "trace", num_particles: int = 1,
                  batch_size: int = 1024) -> float:
    """Mean ELBO per data point (nats) of ``data`` (``(N, *data_shape)``, any real dtype) under ``elbo``,
    without gradients, in batches of ``batch_size`` (an integer >= 1; :class:`ConfigError` otherwise).

    The ELBO proper, ``E_q[log p(x|z)] - KL(q(z|x) || p(z))``, whatever the VAE's KL weight ``beta`` (the
    beta-weighted training objective is ``History``'s ``train_objective``)."""
    x = vae.as_data(as_tensor_data(data, "data"), "data", data_set=True)
    batch_size = integer("batch_size", batch_size, 1)
    loss_fn = make_elbo(elbo, num_particles)
    device = vae._device()
    total = 0.0
    with torch.no_grad(), unit_kl_weight(vae):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(device)
            total += loss_fn.loss(vae.model, vae.guide, xb)
    return -total / x.shape[0]


SYNC_EVERY = 20
"""Steps between host synchronizations: the non-finite check, the progress bar and, in distributed runs, the
agreement on a stop request. Steps in between queue their work on the device without waiting for it."""


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM set a flag that training reads between steps; a second signal acts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
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


class _StepGuard:
    """An optimizer step pre-hook: in distributed runs it sums the ranks' weighted gradients (and clips the
    result); always it records, without waiting for the device, the first step whose loss or gradient is not
    finite. :meth:`sync` reads those records on the host and raises."""

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device, ctx: Any,
                 clip_norm: Optional[float], steps_per_epoch: int, ckpt_dir: Optional[Path]) -> None:
        self.params, self.ctx, self.clip_norm = list(params), ctx, clip_norm
        self.steps_per_epoch, self.ckpt_dir = steps_per_epoch, ckpt_dir
        self.bad_loss = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_grad = torch.zeros((), dtype=torch.int64, device=device)
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)  # read by a captured step too
        self.weight = 1.0

    def set_step(self, step: int) -> None:
        self.step_t.fill_(step)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        from . import distributed

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
        self._record(self.bad_loss, loss.detach())

    def sync(self, stop: bool) -> bool:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss or gradient (on any
        rank); return whether any rank asked to stop."""
        bad_loss, bad_grad = int(self.bad_loss), int(self.bad_grad)
        if self.ctx.enabled:
            bad_loss, bad_grad, stop = _reduce_flags(bad_loss, bad_grad, stop)
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
        from .checkpoint import has_checkpoint

        if self.ckpt_dir is None:
            return ""
        if has_checkpoint(self.ckpt_dir):
            return f"; the last good checkpoint in {self.ckpt_dir} is untouched (resume_from / --resume)"
        return f"; no checkpoint was written to {self.ckpt_dir} before it"


def _reduce_flags(bad_loss: int, bad_grad: int, stop: bool) -> tuple[int, int, bool]:
    """Across ranks: the earliest bad step of each kind (0 = none) and whether any rank asked to stop."""
    import torch.distributed as tdist

    from .distributed import _comm_device

    big = 2 ** 62
    t = torch.tensor([bad_loss or big, bad_grad or big, 0 if stop else 1], dtype=torch.int64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    lo, gr, go = t.tolist()
    return (0 if lo == big else lo), (0 if gr == big else gr), go == 0


_RUN_FOLDERS: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("pyro_vae_run_folders")


def _holding_run_folders(fn: Any) -> Any:
    """Whatever run-folder lock ``fn`` takes (:func:`_lock_run_folder`) is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _RUN_FOLDERS.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _RUN_FOLDERS.reset(token)

    return wrapper


def _lock_run_folder(folder: Path, resume_from: Any, overwrite: bool) -> None:
    """Lock ``folder`` until :func:`fit` ends; a new run refuses a folder training already wrote."""
    from . import checkpoint as ckpt

    here = os.path.realpath(folder)
    resume = resume_from is not None and here in (os.path.realpath(resume_from),
                                                  os.path.dirname(os.path.realpath(resume_from)))
    _RUN_FOLDERS.get().enter_context(ckpt.open_run(folder, resume=resume, overwrite=overwrite))


def _flag(name: str, value: Any) -> bool:
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(message(name, "True or False", repr(value), f"pass {name}=True or {name}=False"))


def _check_finite_record(record: dict[str, Any], guard: "_StepGuard") -> None:
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


@_holding_run_folders
def fit(
    vae: VAE,
    train_data: Any,
    *,
    elbo: Union[str, ELBO] = "trace",
    num_particles: int = 1,
    estimator: str = "pathwise",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_data: Any = None,
    device: Union[str, torch.device] = "auto",
    seed: Optional[int] = 0,
    callbacks: Sequence[Any] = (),
    dynamic_binarize: bool = False,
    clip_norm: Optional[float] = None,
    progress: bool = True,
    checkpoint_dir: Union[str, Path, None] = None,
    checkpoint_every: Optional[int] = None,
    resume_from: Union[str, Path, None] = None,
    cuda_graph: bool = False,
    overwrite: bool = False,
) -> History:
    """Train ``vae`` by minibatch SVI with Adam.

    Runs as one process, or data-parallel under an initialized ``torch.distributed`` process group (see
    :mod:`pyro_vae.distributed`): ``batch_size`` is then the global batch, shared out among the ranks.

    Args:
        vae: the model/guide pair to train (moved to ``device``).
        train_data: ``(N, *data_shape)`` tensor or :class:`pyro_vae.data.Dataset`, of any real dtype
            (floating point, integer or bool: cast to the dtype of the VAE's parameters, values unchanged).
        elbo: ``"trace"``, ``"meanfield"`` or any ``pyro.infer.ELBO``.
        num_particles: Monte Carlo particles per step (vectorized).
        estimator: gradient estimator, a name of :data:`pyro_vae.estimators.ESTIMATORS` (``"pathwise"``,
            ``"score-function"``, ``"score-function-baseline"``, ``"straight-through"``, ...).
        epochs, batch_size, lr: the usual (``batch_size`` over all processes together).
        val_data: optional validation data; its ELBO is recorded every epoch.
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
            folder that training already wrote is refused unless ``resume_from`` it or ``overwrite``.
        checkpoint_every: also checkpoint every this many optimizer steps.
        resume_from: a ``checkpoint.pt`` (or the folder holding one) to continue from; with the same
            configuration and seed, the result is bit for bit that of an uninterrupted run on the same device
            (statistically the same, not bit for bit, with ``cuda_graph=True``). The folder of a run stopped
            before its first checkpoint starts from step 0 (with a warning).
        cuda_graph: on a CUDA device, record the training step as a CUDA graph after four eager steps and
            replay it for every full minibatch (:class:`pyro_vae.step.CUDAGraphStep`), which removes Pyro's
            per-step Python cost. For a Gaussian latent under ``"trace"`` or ``"meanfield"`` with the
            pathwise estimator, in one process; callbacks must not change what the model or guide read from
            Python (KL-weight and temperature schedules are refused; a changed learning rate re-records the
            step). Same objective and gradients as the eager step, with other random numbers.
        overwrite: replace the run in ``checkpoint_dir`` (its files are removed once training starts).

    Returns:
        :class:`History` of per-epoch train and validation ELBOs and the training objective (nats per data
        point; the ELBO is always the one with KL weight 1, see :class:`History`).

    Raises:
        ConfigError: an argument out of range (checked before any work), or a VAE too large for the device.
        DataError: data of the wrong shape or dtype, non-finite, outside the likelihood's support, or (with
            ``dynamic_binarize``) outside [0, 1].
        ModelError: a part of the VAE returned NaN parameters or no distribution (at the first, validated step).
        NonFiniteLossError: a loss or gradient, or an epoch's training or validation ELBO, turned NaN or
            infinite (the message gives epoch and step; no checkpoint is written after it).
        CheckpointError: ``checkpoint_dir`` holds a run (without ``resume_from``/``overwrite``) or is locked by
            another run; ``resume_from`` is missing, damaged or from another configuration.
        TrainingInterrupted: SIGINT or SIGTERM arrived; a checkpoint was written first when ``checkpoint_dir``
            is set.
    """
    from . import checkpoint as ckpt
    from . import distributed

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
    num_particles = integer("num_particles", num_particles, 1)  # plain Python values: they go into checkpoints
    dynamic_binarize, progress, cuda_graph, overwrite = (_flag(name, value) for name, value in (
        ("dynamic_binarize", dynamic_binarize), ("progress", progress), ("cuda_graph", cuda_graph),
        ("overwrite", overwrite)))
    elbo, estimator = (str(v) if isinstance(v, str) else v for v in (elbo, estimator))
    ctx = distributed.context()
    if seed is not None:
        seed = integer("seed", seed, 0, 2 ** 32 - ctx.world_size)  # numpy's seeds stop at 2**32 - 1
    if batch_size < ctx.world_size:
        raise ConfigError(message("batch_size", f"at least the number of processes ({ctx.world_size}); it is the "
                                  "global batch", repr(batch_size), f"pass batch_size >= {ctx.world_size}"))
    dev = resolve_device(device)
    if cuda_graph:
        _check_cuda_graph(vae, dev, ctx, estimator, elbo, callbacks)
    x = vae.as_data(as_tensor_data(train_data, "train_data"), "train_data", data_set=True)
    xv = vae.as_data(as_tensor_data(val_data, "val_data"), "val_data", data_set=True) if val_data is not None else None
    if dynamic_binarize:  # grey levels are probabilities of a one: refused outside [0, 1], never clamped
        from .data import check_binarizable

        check_binarizable(x, "train_data (dynamic_binarize=True)")
    vae.check_data(x >= 0.5 if dynamic_binarize else x, "train_data", data_set=True)
    if xv is not None:
        vae.check_data(xv, "val_data", data_set=True)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    check_memory("fit", 4 * weights + (x.numel() * x.element_size() if dev.type != "cpu" else 0), dev,
                 "use a smaller VAE", "weights, gradients and Adam's two moments" +
                 (", and the training data" if dev.type != "cpu" else ""))
    batch_bytes = min(batch_size, len(x)) * math.prod(vae.data_shape) * torch.finfo(torch.float32).bits // 8
    check_memory("num_particles", 3 * int(num_particles) * batch_bytes, dev,
                 "use fewer particles or a smaller batch_size",
                 f"{num_particles} particles' decoder outputs, log-densities and gradients")
    if seed is not None:
        pyro.set_rng_seed(seed + ctx.rank)
    if estimator != "pathwise":
        from .estimators import check_estimator

        check_estimator(estimator, vae)
    loss_fn = make_elbo(elbo, num_particles, estimator, vae.data_shape)
    vae.to(dev)
    distributed.broadcast_module(vae)
    x = x.to(dev)
    n = x.shape[0]
    extra = [m.to(dev) for m in getattr(loss_fn, "extra_modules", list)()]  # e.g. a neural baseline
    for m in extra:
        distributed.broadcast_module(m)
    own = [*vae.parameters(), *(p for m in extra for p in m.parameters())]
    user_params = _user_params(loss_fn, vae, x[: min(batch_size, n)], n, own, dynamic_binarize)
    for p in user_params.values():
        distributed.broadcast_tensor(p)
    optimizer = torch.optim.Adam([*own, *user_params.values()], lr=lr, capturable=bool(cuda_graph))
    params_in_store = len(pyro.get_param_store())
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume_from is not None and distributed.rank0_call(lambda: ckpt.started_without_checkpoint(resume_from)):
        warnings.warn(f"resume_from {resume_from}: the run stopped before its first checkpoint, so there is "
                      "nothing to continue; training starts from step 0", stacklevel=3)
        resume_from = None
    if ckpt_dir is not None:
        size = sum(t.numel() * t.element_size() for t in vae.state_dict().values())
        distributed.rank0_call(lambda: ckpt.check_writable(ckpt_dir, 9 * size + 2 ** 20))
        distributed.rank0_call(lambda: _lock_run_folder(ckpt_dir, resume_from, overwrite))
    history = History()
    state = TrainState(vae=vae, optimizer=optimizer, history=history)
    signature = {"num_data": n, "batch_size": batch_size, "lr": lr, "clip_norm": clip_norm,
                 "elbo": elbo if isinstance(elbo, str) else type(elbo).__name__, "num_particles": num_particles,
                 "estimator": estimator, "dynamic_binarize": dynamic_binarize, "seed": seed}
    vae_config = vae.config
    shuffle_seed = seed if seed is not None else distributed.broadcast_object(int(torch.randint(2 ** 31 - 1, ())))
    steps_per_epoch = math.ceil(n / batch_size)
    best, start_epoch, start_batch, carried = -math.inf, 1, 0, [0.0, 0.0]
    if resume_from is not None:
        payload = distributed.rank0_call(
            lambda: ckpt.load_training_state(resume_from, vae_config=vae_config, signature=signature))
        _restore(payload, vae, optimizer, ctx, resume_from, extra)
        _set_capturable(optimizer, bool(cuda_graph))
        history.epochs = list(payload["history"])
        best, state.step, shuffle_seed = payload["best"], payload["step"], payload["shuffle_seed"]
        if payload["epoch_complete"]:
            start_epoch = payload["epoch"] + 1
        else:
            start_epoch, start_batch = payload["epoch"], payload["batch"]
            carried = _epoch_totals(payload["epoch_total"])
    guard = _StepGuard(params, dev, ctx, clip_norm if ctx.enabled else None, steps_per_epoch, ckpt_dir)
    hook = optimizer.register_step_pre_hook(guard)
    graph_step = None
    if cuda_graph:
        graph_step = CUDAGraphStep(loss_fn, vae, x[: min(batch_size, n)], n, optimizer, params, clip_norm)

    def save(epoch: int, batch: int, complete: bool, total: list[float], record: Optional[dict] = None) -> None:
        nonlocal best
        ranks = distributed.all_gather_object((ckpt.rng_state(), _pyro_params(list(user_params))))
        score = None if record is None else (record["val_elbo"] if record["val_elbo"] is not None
                                             else record["train_elbo"])
        is_best = score is not None and score > best
        if is_best:
            best = score
        if not ctx.is_main or ckpt_dir is None:
            return
        from . import __version__

        payload = {
            "format": ckpt.FORMAT, "version": __version__, "signature": signature,
            "vae_config": json.dumps(vae_config) if vae_config is not None else None,
            "vae": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
            "extra_modules": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in extra],
            "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch, "epoch_complete": complete,
            "step": state.step, "epoch_total": total, "history": history.epochs, "best": best,
            "shuffle_seed": shuffle_seed, "world_size": ctx.world_size, "rng": [r for r, _ in ranks],
            "pyro_params": [p for _, p in ranks],
        }
        files = {ckpt.CHECKPOINT: ckpt.tensor_bytes(payload)}
        if is_best:  # one commit: best.pt never lags behind the best score checkpoint.pt records
            files[ckpt.BEST] = files[ckpt.CHECKPOINT]
            files[ckpt.BEST_JSON] = ckpt.json_bytes({"epoch": epoch, "step": state.step, "elbo": score})
        ckpt.RunFolder(ckpt_dir).commit(files)

    def interrupted(stopper: _StopOnSignal, epoch: int) -> TrainingInterrupted:
        where = f"training stopped by {stopper.signal_name or 'a signal'} at epoch {epoch}, step {state.step}"
        if ckpt_dir is None:
            return TrainingInterrupted(f"{where}; no checkpoint_dir was given, so nothing was saved (the VAE "
                                       "holds the parameters of that step)", None, epoch, state.step)
        path = ckpt_dir / ckpt.CHECKPOINT
        return TrainingInterrupted(f"{where}; checkpoint written to {path}. Resume with the same options and "
                                   f"fit(..., resume_from={str(ckpt_dir)!r}) or `pyro-vae train ... --resume`",
                                   str(path), epoch, state.step)

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, initial=state.step, unit="step", dynamic_ncols=True,
                   leave=False)
    _fit_start(state, callbacks, loss_fn, x[:2], bar if ctx.is_main else False, dynamic_binarize)
    first_step = state.step
    vae.train()
    try:
        with _StopOnSignal() as stopper:
            for epoch in range(start_epoch, epochs + 1):
                state.epoch = epoch
                start = time.perf_counter()
                first = start_batch if epoch == start_epoch else 0
                total = torch.zeros(2, dtype=torch.float64, device=dev)  # objective and ELBO losses
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed + epoch)).to(dev)
                shown = state.step
                for i in range(first, steps_per_epoch):
                    idx = perm[i * batch_size: (i + 1) * batch_size]
                    b = idx.numel()
                    if ctx.enabled:
                        idx = idx[ctx.rank:: ctx.world_size]
                    guard.set_step(state.step + 1)
                    guard.weight = idx.numel() / b
                    if idx.numel() == 0:  # this rank's share of a short last batch is empty
                        for p in params:
                            p.grad = torch.zeros_like(p)
                        optimizer.step()
                        loss = torch.zeros((), device=dev)
                    else:
                        xb = x[idx]
                        if dynamic_binarize:
                            xb = torch.bernoulli(xb)
                        try:
                            if graph_step is not None and state.step != first_step:
                                loss = graph_step(xb).clone()  # a replay overwrites its loss tensor
                            else:
                                loss = torch.as_tensor(svi_step(
                                    loss_fn, vae, xb, n, optimizer, params, None if ctx.enabled else clip_norm,
                                    validate=None if state.step == first_step else False, check_finite=False))
                        except Exception:
                            if not ctx.enabled:
                                guard.sync(False)  # an earlier NaN explains this failure: report that instead
                            raise
                    guard.note_loss(loss)
                    state.step += 1
                    state.loss = loss
                    elbo_loss = _unit_beta_loss(loss_fn, vae, xb, n, loss) if idx.numel() else loss
                    total += torch.stack([loss.detach(), elbo_loss.detach()]).to(total.dtype) * (idx.numel() / n)
                    for cb in callbacks:
                        if hasattr(cb, "on_step"):
                            cb.on_step(state)
                    last = i == steps_per_epoch - 1
                    ckpt_now = checkpoint_every is not None and state.step % checkpoint_every == 0 and not last
                    if last or ckpt_now or state.step % SYNC_EVERY == 0 or (stopper.requested and not ctx.enabled):
                        stop = guard.sync(stopper.requested)
                        if bar is not None:
                            bar.update(state.step - shown)
                            shown = state.step
                            bar.set_postfix(epoch=epoch, elbo=f"{-float(elbo_loss) / n:.2f}")
                        if stop or ckpt_now:
                            save(epoch, i + 1, False, _add(carried, _global_sum(total, ctx)))
                        if stop:
                            raise interrupted(stopper, epoch)
                objective_f, elbo_f = _add(carried, _global_sum(total, ctx))
                carried = [0.0, 0.0]
                record: dict[str, Any] = {"epoch": epoch, "step": state.step, "train_elbo": -elbo_f / n,
                                          "train_objective": -objective_f / n, "beta": _beta(vae),
                                          "val_elbo": None}
                if xv is not None:
                    vae.eval()
                    record["val_elbo"] = _val_elbo(vae, xv, loss_fn, max(batch_size, 512), ctx)
                    vae.train()
                _check_finite_record(record, guard)
                record["seconds"] = time.perf_counter() - start
                _check_no_new_params(user_params, params_in_store)
                history.epochs.append(record)
                save(epoch, steps_per_epoch, True, [0.0, 0.0], record)
                for cb in callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        cb.on_epoch_end(state)
                if guard.sync(stopper.requested):
                    raise interrupted(stopper, epoch)
                if state.stop:
                    break
    finally:
        hook.remove()
        if bar is not None:
            bar.close()
        vae.eval()
    return history


def _check_cuda_graph(vae: VAE, dev: torch.device, ctx: Any, estimator: str, elbo: Any,
                      callbacks: Sequence[Any]) -> None:
    """Refuse, before any work, the configurations whose step a CUDA graph cannot replay faithfully."""
    from .schedules import Schedule

    def refuse(found: str, fix: str) -> ConfigError:
        return ConfigError(message("cuda_graph=True", "a Gaussian VAE on a CUDA device, trained by one process "
                                   "with the pathwise estimator", found, fix))

    for cb in callbacks:
        if isinstance(cb, Schedule):
            raise refuse(f"callback {cb!r}, which changes a value the captured step reads from Python",
                         "drop the schedule, or pass cuda_graph=False")
    if getattr(vae, "latent", "gaussian") != "gaussian":
        raise refuse(f"latent={vae.latent!r} (its temperature is Python state)", "pass cuda_graph=False")
    if estimator != "pathwise":
        raise refuse(f"estimator={estimator!r}", "pass cuda_graph=False for other gradient estimators")
    if not isinstance(elbo, str) and _fast_kind(elbo) is None:
        raise refuse(f"elbo={type(elbo).__name__}", "use elbo=\"trace\" or \"meanfield\", or cuda_graph=False")
    if ctx.enabled:
        raise refuse(f"{ctx.world_size} processes", "pass cuda_graph=False for data-parallel training")
    if dev.type != "cuda":
        raise refuse(f"device {dev}", "pass device=\"cuda\", or cuda_graph=False")


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
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


def _global_sum(total: torch.Tensor, ctx: Any) -> list[float]:
    from . import distributed

    values = [float(t) for t in total]
    return distributed.all_reduce_sum(values, total.device) if ctx.enabled else values


def _add(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [float(u) + float(v) for u, v in zip(a, b)]


def _epoch_totals(saved: Any) -> list[float]:
    """A checkpoint's partial-epoch sums ``[objective loss, ELBO loss]`` (one number in older checkpoints,
    written when the two were the same)."""
    return [float(saved), float(saved)] if isinstance(saved, (int, float)) else [float(v) for v in saved]


def _beta(vae: Any) -> float:
    return float(getattr(vae, "beta", 1.0))


def _unit_beta_loss(loss_fn: ELBO, vae: Any, xb: torch.Tensor, num_data: int, loss: torch.Tensor) -> torch.Tensor:
    """The step's negative ELBO (KL weight 1) on ``xb``: ``loss`` itself when the objective is the ELBO, else
    one more evaluation of Pyro's ELBO with every KL weight set to 1 (no gradients, no host synchronization
    for ``Trace_ELBO`` / ``TraceMeanField_ELBO``)."""
    if _beta(vae) == 1.0:
        return loss
    from .step import elbo_loss

    with torch.no_grad(), unit_kl_weight(vae), pyro.validation_enabled(False):
        out = elbo_loss(loss_fn, vae.model, vae.guide, xb, num_data=num_data)
        if out is None:
            return torch.as_tensor(loss_fn.loss(vae.model, vae.guide, xb, num_data=num_data), device=loss.device)
    return out[0]


def _val_elbo(vae: VAE, xv: torch.Tensor, loss_fn: ELBO, batch_size: int, ctx: Any) -> float:
    """Validation ELBO per data point; in distributed runs each rank evaluates its interleaved share."""
    from . import distributed

    if not ctx.enabled:
        return evaluate_elbo(vae, xv, elbo=loss_fn, batch_size=batch_size)
    share = xv[ctx.rank:: ctx.world_size]
    part = evaluate_elbo(vae, share, elbo=loss_fn, batch_size=batch_size) * len(share) if len(share) else 0.0
    return distributed.all_reduce_sum([part], xv.device)[0] / len(xv)


def _restore(payload: dict[str, Any], vae: VAE, optimizer: torch.optim.Optimizer, ctx: Any,
             source: Union[str, Path], extra: Sequence[torch.nn.Module] = ()) -> None:
    from .checkpoint import set_rng_state

    try:
        vae.load_state_dict(payload["vae"])
        for module, sd in zip(extra, payload.get("extra_modules", [])):
            module.load_state_dict(sd)
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(message(f"checkpoint {source}", "weights and optimizer state of this VAE",
                                      f"a mismatch ({first})",
                                      "resume with the VAE configuration of the original run")) from None
    rngs = payload.get("rng") or []
    if len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank])
        _set_pyro_params((payload.get("pyro_params") or [{}] * ctx.world_size)[ctx.rank])
    else:
        warnings.warn(f"checkpoint {source} was written by {len(rngs)} process(es), this run has "
                      f"{ctx.world_size}: the random streams are reseeded, so the run continues correctly but not "
                      "bit for bit as the original would have", stacklevel=3)
        pyro.set_rng_seed((int(payload["shuffle_seed"]) * 1_000_003 + int(payload["step"])) % 2 ** 31 + ctx.rank)


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
        self.best, self.bad_epochs = -math.inf, 0
        for record in state.history.epochs:
            self._update(record)

    def on_epoch_end(self, state: TrainState) -> None:
        if self._update(state.history.epochs[-1]):
            state.stop = True


def _fit_start(state: TrainState, callbacks: Sequence[Any], loss_fn: ELBO, x: torch.Tensor, bar: Any,
               dynamic_binarize: bool) -> None:
    """Call ``on_fit_start(state)`` of the callbacks that have it (schedules set their step-``state.step``
    value), and under ``TraceMeanField_ELBO`` log once which latent sites get an analytic KL."""
    for cb in callbacks:
        if hasattr(cb, "on_fit_start"):
            cb.on_fit_start(state)
    if bar is False or not isinstance(loss_fn, TraceMeanField_ELBO):
        return
    import logging

    from .kl import kl_report

    dev = x.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # leave the training RNG alone
        state.vae.eval()
        report = str(kl_report(state.vae, torch.bernoulli(x) if dynamic_binarize else x))
        state.vae.train()
    logging.getLogger("pyro_vae").info(report)
    if bar is not None:
        bar.write(report)


def _user_params(loss_fn: ELBO, vae: VAE, xb: torch.Tensor, num_data: int, own: Sequence[torch.Tensor],
                 dynamic_binarize: bool = False) -> dict[str, torch.Tensor]:
    """The unconstrained tensors of the ``pyro.param`` sites that the model and guide traces touch and that
    are not parameters of the VAE's (or the ELBO's) modules: what ``pyro.infer.SVI`` would optimize beyond
    them, e.g. a ``pyro.param`` declared inside a user prior, likelihood or encoder. One evaluation of the
    loss on ``xb``, with the random streams left as they were."""
    from pyro import poutine

    dev = xb.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        if dynamic_binarize:  # the batch as the steps see it
            xb = torch.bernoulli(xb)
        with poutine.trace(param_only=True) as capture:
            loss_fn.loss(vae.model, vae.guide, xb, num_data=num_data)
    known = {id(p) for p in own}
    found: dict[str, torch.Tensor] = {}
    for name, site in capture.trace.nodes.items():
        value = site["value"]
        unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
        if id(unconstrained) not in known and unconstrained.requires_grad:
            found[name] = unconstrained
            known.add(id(unconstrained))
    return found


def _check_no_new_params(user_params: dict[str, torch.Tensor], own_count: int) -> None:
    """Refuse a ``pyro.param`` first created after training started that the steps differentiate: the optimizer
    was built without it. (Entries Pyro updates itself, such as ``TraceGraph_ELBO``'s average baselines, have no
    gradient and pass.)"""
    store = pyro.get_param_store()
    if len(store) <= own_count:
        return
    new = [name for name in store.keys() if "$$$" not in name and name not in user_params
           and store.get_param(name).unconstrained().grad is not None]  # differentiated, yet not optimized
    if new:
        raise ConfigError(message(
            f"pyro.param {new[0]!r}", "every pyro.param of the model and guide created by their first call",
            "a pyro.param first created after training started, which the optimizer does not hold",
            "create it unconditionally when the part is called (or in the part's __init__ as an nn.Parameter)"))


def _pyro_params(optimized: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Unconstrained values of the Pyro param-store entries outside the VAE's own modules: those that belong to
    no ``nn.Module`` (a ``pyro.param`` of a user part, ``TraceGraph_ELBO``'s decaying-average baselines) and
    the ``optimized`` ones, which include the parameters of a module a user part registers with
    ``pyro.module``; the VAE's module parameters travel in its state dict."""
    store = pyro.get_param_store()
    keep = set(optimized)
    return {name: store.get_param(name).unconstrained().detach().cpu() for name in store.keys()
            if "$$$" not in name or name in keep}


@torch.no_grad()
def _set_pyro_params(values: dict[str, torch.Tensor]) -> None:
    """Write checkpointed unconstrained values into the param store, in place where the param exists (the
    optimizer holds those tensors)."""
    store = pyro.get_param_store()
    for name, value in values.items():
        if name in store:
            target = store.get_param(name).unconstrained()
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        else:
            store[name] = value
