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
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pyro
import torch
from pyro.infer import ELBO, TraceMeanField_ELBO

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import CheckpointError, ConfigError, TrainingInterrupted, message
from pyro_vae.infer.elbo import evaluate_elbo, make_elbo
from pyro_vae.models.vae import VAE, unit_kl_weight
from pyro_vae.train.callbacks import History, TrainState
from pyro_vae.train.cuda_graph import CUDAGraphStep, check_cuda_graph, set_capturable
from pyro_vae.train.guards import StepGuard, StopOnSignal, check_finite_record
from pyro_vae.train.params import check_no_new_params, collect_user_params, pyro_param_values, set_pyro_param_values
from pyro_vae.train.step import svi_step
from pyro_vae.validation import check_memory, integer, positive, resolve_device

__all__ = ["fit", "SYNC_EVERY"]

SYNC_EVERY = 20
"""Steps between host synchronizations: the non-finite check, the progress bar and, in distributed runs, the
agreement on a stop request. Steps in between queue their work on the device without waiting for it."""


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
    from pyro_vae import checkpoint as ckpt

    here = os.path.realpath(folder)
    resume = resume_from is not None and here in (os.path.realpath(resume_from),
                                                  os.path.dirname(os.path.realpath(resume_from)))
    _RUN_FOLDERS.get().enter_context(ckpt.open_run(folder, resume=resume, overwrite=overwrite))


def _flag(name: str, value: Any) -> bool:
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(message(name, "True or False", repr(value), f"pass {name}=True or {name}=False"))


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
    from pyro_vae import checkpoint as ckpt
    from pyro_vae.train import distributed

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
        check_cuda_graph(vae, dev, ctx, estimator, elbo, callbacks)
    x = vae.as_data(as_tensor_data(train_data, "train_data"), "train_data", data_set=True)
    xv = vae.as_data(as_tensor_data(val_data, "val_data"), "val_data", data_set=True) if val_data is not None else None
    if dynamic_binarize:  # grey levels are probabilities of a one: refused outside [0, 1], never clamped
        from pyro_vae.data import check_binarizable

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
        from pyro_vae.infer.estimators import check_estimator

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
    user_params = collect_user_params(loss_fn, vae, x[: min(batch_size, n)], n, own, dynamic_binarize)
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
        set_capturable(optimizer, bool(cuda_graph))
        history.epochs = list(payload["history"])
        best, state.step, shuffle_seed = payload["best"], payload["step"], payload["shuffle_seed"]
        if payload["epoch_complete"]:
            start_epoch = payload["epoch"] + 1
        else:
            start_epoch, start_batch = payload["epoch"], payload["batch"]
            carried = _epoch_totals(payload["epoch_total"])
    guard = StepGuard(params, dev, ctx, clip_norm if ctx.enabled else None, steps_per_epoch, ckpt_dir)
    hook = optimizer.register_step_pre_hook(guard)
    graph_step = None
    if cuda_graph:
        graph_step = CUDAGraphStep(loss_fn, vae, x[: min(batch_size, n)], n, optimizer, params, clip_norm)

    def save(epoch: int, batch: int, complete: bool, total: list[float], record: Optional[dict] = None) -> None:
        nonlocal best
        ranks = distributed.all_gather_object((ckpt.rng_state(), pyro_param_values(list(user_params))))
        score = None if record is None else (record["val_elbo"] if record["val_elbo"] is not None
                                             else record["train_elbo"])
        is_best = score is not None and score > best
        if is_best:
            best = score
        if not ctx.is_main or ckpt_dir is None:
            return
        from pyro_vae.version import __version__

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

    def interrupted(stopper: StopOnSignal, epoch: int) -> TrainingInterrupted:
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
        with StopOnSignal() as stopper:
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
                check_finite_record(record, guard)
                record["seconds"] = time.perf_counter() - start
                check_no_new_params(user_params, params_in_store)
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


def _global_sum(total: torch.Tensor, ctx: Any) -> list[float]:
    from pyro_vae.train import distributed

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
    from pyro_vae.infer.losses import elbo_loss

    with torch.no_grad(), unit_kl_weight(vae), pyro.validation_enabled(False):
        out = elbo_loss(loss_fn, vae.model, vae.guide, xb, num_data=num_data)
        if out is None:
            return torch.as_tensor(loss_fn.loss(vae.model, vae.guide, xb, num_data=num_data), device=loss.device)
    return out[0]


def _val_elbo(vae: VAE, xv: torch.Tensor, loss_fn: ELBO, batch_size: int, ctx: Any) -> float:
    """Validation ELBO per data point; in distributed runs each rank evaluates its interleaved share."""
    from pyro_vae.train import distributed

    if not ctx.enabled:
        return evaluate_elbo(vae, xv, elbo=loss_fn, batch_size=batch_size)
    share = xv[ctx.rank:: ctx.world_size]
    part = evaluate_elbo(vae, share, elbo=loss_fn, batch_size=batch_size) * len(share) if len(share) else 0.0
    return distributed.all_reduce_sum([part], xv.device)[0] / len(xv)


def _restore(payload: dict[str, Any], vae: VAE, optimizer: torch.optim.Optimizer, ctx: Any,
             source: Union[str, Path], extra: Sequence[torch.nn.Module] = ()) -> None:
    from pyro_vae.checkpoint import set_rng_state

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
        set_pyro_param_values((payload.get("pyro_params") or [{}] * ctx.world_size)[ctx.rank])
    else:
        warnings.warn(f"checkpoint {source} was written by {len(rngs)} process(es), this run has "
                      f"{ctx.world_size}: the random streams are reseeded, so the run continues correctly but not "
                      "bit for bit as the original would have", stacklevel=3)
        pyro.set_rng_seed((int(payload["shuffle_seed"]) * 1_000_003 + int(payload["step"])) % 2 ** 31 + ctx.rank)


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

    from pyro_vae.infer.kl_report import kl_report

    dev = x.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # leave the training RNG alone
        state.vae.eval()
        report = str(kl_report(state.vae, torch.bernoulli(x) if dynamic_binarize else x))
        state.vae.train()
    logging.getLogger("pyro_vae").info(report)
    if bar is not None:
        bar.write(report)
