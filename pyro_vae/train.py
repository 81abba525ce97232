"""Training: minibatch stochastic variational inference over the VAE's model and guide.

:func:`fit` drives Pyro's own ``ELBO.loss_and_grads`` (the call ``SVI.step`` makes) and steps a
``torch.optim.Adam`` over ``vae.parameters()``. Holding a torch optimizer rather than Pyro's per-parameter
wrappers is what lets its state go into one checkpoint and lets the same loop run under
``DistributedDataParallel``; the objective is Pyro's, unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .errors import ConfigError, NonFiniteLossError, message
from .step import svi_step
from .vae import VAE

__all__ = ["fit", "make_elbo", "evaluate_elbo", "History", "TrainState", "resolve_device", "as_tensor_data",
           "ELBOS"]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def make_elbo(elbo: Union[str, ELBO] = "trace", num_particles: int = 1) -> ELBO:
    """``"trace"`` (``Trace_ELBO``, Monte Carlo KL) or ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KL
    where one is registered), with ``num_particles`` vectorized particles; an ELBO object is returned as is."""
    if isinstance(elbo, ELBO):
        return elbo
    if elbo not in ELBOS:
        raise ConfigError(message("elbo", f"one of {sorted(ELBOS)} or a pyro.infer.ELBO", repr(elbo),
                                  "pick a known name"))
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ConfigError(message("num_particles", "an integer >= 1", repr(num_particles), "pass num_particles=1"))
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
    """Per-epoch records: ``{"epoch", "step", "train_elbo", "val_elbo", "seconds"}`` (ELBOs in nats per
    data point; ``val_elbo`` is ``None`` without validation data)."""

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
    every epoch (``state.stop = True`` ends training)."""

    vae: VAE
    optimizer: torch.optim.Optimizer
    history: History
    epoch: int = 0
    step: int = 0
    loss: float = math.nan
    stop: bool = False


def evaluate_elbo(vae: VAE, data: Any, *, elbo: Union[str, ELBO] = "trace", num_particles: int = 1,
                  batch_size: int = 1024) -> float:
    """Mean ELBO per data point (nats) of ``data`` under ``elbo``, without gradients."""
    x = as_tensor_data(data, "data")
    loss_fn = make_elbo(elbo, num_particles)
    device = vae._device()
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(device)
            total += loss_fn.loss(vae.model, vae.guide, xb)
    return -total / x.shape[0]


def _check_positive(name: str, value: Any, integer: bool) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise ConfigError(message(name, kind, repr(value), f"pass a valid {name}"))


def fit(
    vae: VAE,
    train_data: Any,
    *,
    elbo: Union[str, ELBO] = "trace",
    num_particles: int = 1,
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
) -> History:
    """Train ``vae`` by minibatch SVI with Adam.

    Args:
        vae: the model/guide pair to train (moved to ``device``).
        train_data: ``(N, *data_shape)`` tensor or :class:`pyro_vae.data.Dataset`.
        elbo: ``"trace"``, ``"meanfield"`` or any ``pyro.infer.ELBO``.
        num_particles: Monte Carlo particles per step (vectorized).
        epochs, batch_size, lr: the usual.
        val_data: optional validation data; its ELBO is recorded every epoch.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
        seed: seeds Pyro, torch, numpy and Python (``None`` leaves the RNGs alone).
        callbacks: objects with optional ``on_step(state)`` / ``on_epoch_end(state)`` (:class:`TrainState`).
        dynamic_binarize: resample binary data from the grey levels every batch (Burda et al. 2016).
        clip_norm: clip the gradient's global norm to this value.
        progress: show a tqdm progress bar with the running ELBO.
        checkpoint_dir: write ``checkpoint.pt`` (last epoch) and ``best.pt`` (best validation ELBO) here.

    Returns:
        :class:`History` of per-epoch train and validation ELBOs (nats per data point).
    """
    _check_positive("epochs", epochs, True)
    _check_positive("batch_size", batch_size, True)
    _check_positive("lr", lr, False)
    if clip_norm is not None:
        _check_positive("clip_norm", clip_norm, False)
    dev = resolve_device(device)
    x = as_tensor_data(train_data, "train_data")
    xv = as_tensor_data(val_data, "val_data") if val_data is not None else None
    checked = torch.bernoulli(x.clamp(0, 1)) if dynamic_binarize else x
    vae.check_data(checked, "train_data")
    if xv is not None:
        vae.check_data(xv, "val_data")
    if seed is not None:
        pyro.set_rng_seed(seed)
    loss_fn = make_elbo(elbo, num_particles)
    vae.to(dev)
    x = x.to(dev)
    n = x.shape[0]
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    history = History()
    state = TrainState(vae=vae, optimizer=optimizer, history=history)
    params = [p for p in vae.parameters() if p.requires_grad]
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    best = -math.inf
    steps_per_epoch = math.ceil(n / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, unit="step", dynamic_ncols=True, leave=False)
    vae.train()
    try:
        for epoch in range(1, epochs + 1):
            state.epoch = epoch
            start = time.perf_counter()
            total = 0.0
            perm = torch.randperm(n, device=dev)
            for i in range(steps_per_epoch):
                xb = x[perm[i * batch_size: (i + 1) * batch_size]]
                if dynamic_binarize:
                    xb = torch.bernoulli(xb)
                loss = svi_step(loss_fn, vae, xb, n, optimizer, params, clip_norm)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(message(
                        f"loss at epoch {epoch}, step {state.step + 1}", "a finite value", repr(loss),
                        "lower the learning rate, set clip_norm, check the data against the likelihood's "
                        "support, or use a likelihood with a learned or larger scale"
                        + (f"; the last good checkpoint in {ckpt_dir} is untouched" if ckpt_dir else "")))
                state.step += 1
                state.loss = loss
                total += loss * xb.shape[0] / n
                for cb in callbacks:
                    if hasattr(cb, "on_step"):
                        cb.on_step(state)
                if bar is not None:
                    bar.update(1)
                    if state.step % 10 == 0:
                        bar.set_postfix(epoch=epoch, elbo=f"{-loss / n:.2f}")
            record: dict[str, Any] = {"epoch": epoch, "step": state.step, "train_elbo": -total / n,
                                      "val_elbo": None}
            if xv is not None:
                vae.eval()
                record["val_elbo"] = evaluate_elbo(vae, xv, elbo=loss_fn, batch_size=max(batch_size, 512))
                vae.train()
            record["seconds"] = time.perf_counter() - start
            history.epochs.append(record)
            if ckpt_dir is not None:
                _save_checkpoint(ckpt_dir, state, record, best)
                score = record["val_elbo"] if record["val_elbo"] is not None else record["train_elbo"]
                best = max(best, score)
            for cb in callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(state)
            if state.stop:
                break
    finally:
        if bar is not None:
            bar.close()
        vae.eval()
    return history


def _save_checkpoint(ckpt_dir: Path, state: TrainState, record: dict[str, Any], best: float) -> None:
    from .checkpoint import save_tensors, write_json

    payload = {
        "vae": {k: v.detach().cpu() for k, v in state.vae.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "torch_rng": torch.get_rng_state(),
    }
    save_tensors(ckpt_dir / "checkpoint.pt", payload)
    score = record["val_elbo"] if record["val_elbo"] is not None else record["train_elbo"]
    if score > best:
        save_tensors(ckpt_dir / "best.pt", payload)
        write_json(ckpt_dir / "best.json", {"epoch": state.epoch, "step": state.step, "elbo": score})
