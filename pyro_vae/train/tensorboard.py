"""TensorBoard logging of :func:`pyro_vae.fit`'s training: the :class:`TensorBoard` callback.

TensorBoard is an optional extra (``pip install 'pyro-vae[tensorboard]'``); it is imported when the callback is
built, never by ``import pyro_vae``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.kl import kl_report
from pyro_vae.models.vae import VAE
from pyro_vae.train.callbacks import TrainState
from pyro_vae.validation import boolean, integer

__all__ = ["TensorBoard", "TAGS"]

TAGS: dict[str, str] = {
    "train_elbo": "elbo/train",
    "val_elbo": "elbo/val",
    "train_objective": "objective/train",
    "beta": "beta",
    "seconds": "time/epoch_seconds",
}
"""The TensorBoard tag written for each key of a :class:`~pyro_vae.train.History` record, in this order."""


def _is_rank0() -> bool:
    import torch.distributed as tdist

    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def _image_layout(data_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The ``(channels, height, width)`` a data point of shape ``data_shape`` is drawn as, or ``None`` when it
    is not an image: ``(H, W)``; ``(C, H, W)`` with 1 (grey) or 3 (RGB) channels; a flat ``(D,)`` with
    ``D = s * s`` for an integer ``s >= 2`` (``(64,)`` as 8x8, ``(784,)`` as 28x28, a grey ``s`` x ``s``
    image)."""
    if len(data_shape) == 2:
        return (1, *data_shape)
    if len(data_shape) == 3 and data_shape[0] in (1, 3):
        c, h, w = data_shape
        return c, h, w
    if len(data_shape) == 1:
        s = math.isqrt(data_shape[0])
        if s >= 2 and s * s == data_shape[0]:
            return 1, s, s
    return None


@contextmanager
def _own_rng(device: torch.device, seed: int) -> Iterator[None]:
    """torch's random streams (the CPU's and ``device``'s) seeded with ``seed`` inside, and restored after:
    the training's stream is as if nothing had drawn from it."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextmanager
def _evaluating(vae: VAE) -> Iterator[None]:
    """``vae`` in eval mode without gradients inside; its training mode restored after."""
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        vae.train(was_training)


def _grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The global 2-norm ``sqrt(sum_p ||p.grad||^2)`` of the gradients of the parameters ``optimizer`` steps
    (all its parameter groups; parameters without a gradient are left out, an empty set gives 0), computed in
    float64. Reading it waits for the device."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return 0.0
    with torch.no_grad():
        dev = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).to(dev) for g in grads])
        return float(torch.linalg.vector_norm(norms))


def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each parameter group of ``optimizer`` by tag: ``{"lr": ...}`` for one group,
    ``{"lr/group0": ..., "lr/group1": ...}`` for several."""
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    if len(lrs) == 1:
        return {"lr": lrs[0]}
    return {f"lr/group{i}": lr for i, lr in enumerate(lrs)}


class TensorBoard:
    """A :func:`pyro_vae.fit` callback that writes the training's scalars and a grid of samples as TensorBoard
    events. View them with ``tensorboard --logdir LOG_DIR``. All ELBO, objective and KL values are in nats per
    data point; TensorBoard stores every scalar as float32.

    **Per epoch**, at global step = the epoch (1, 2, ...), from the epoch's record of the
    :class:`~pyro_vae.train.History` (``state.history.epochs[-1]``, the values themselves, not a second
    evaluation; the keys and tags are :data:`TAGS`):

    - ``elbo/train``: ``train_elbo``, the ELBO (KL weight 1) averaged over the epoch's minibatches, nats per
      data point;
    - ``elbo/val``: ``val_elbo``, the validation ELBO at the epoch's end, nats per data point (only when
      ``fit`` has validation data);
    - ``objective/train``: ``train_objective``, what the steps maximized, ``E_q[log p(x|z)] - beta KL``, nats
      per data point;
    - ``beta``: the KL weight at the end of the epoch;
    - ``time/epoch_seconds``: the epoch's wall-clock time in seconds;

    and, read at the epoch's end (after its last step and the callbacks' ``on_step``, so a schedule's setting
    for the next step):

    - ``lr``: ``state.optimizer.param_groups[0]["lr"]``, the learning rate (``lr/group0``, ``lr/group1``, ...
      when the optimizer has several parameter groups);
    - ``temperature``: for a relaxed latent (categorical, or Bernoulli with ``relaxed=True``: ``vae.relaxed``) the
      relaxation temperature ``vae.encoder.temperature`` that the guide and the built-in prior use (set by the
      temperature schedules of :mod:`pyro_vae.schedules`); not written for a Gaussian or exact Bernoulli latent;
    - ``kl/<site>``: for each latent site, ``KL(q(z|x) || p(z))`` averaged over the first ``num_kl_points``
      points of ``data``, nats per data point, with KL weight 1 (whatever ``beta`` is), at the epoch's end
      parameters, as :func:`pyro_vae.infer.kl_report` computes it: the closed form where one is registered,
      else the one-sample Monte Carlo estimate ``log q(z|x) - log p(z)`` at a draw ``z ~ q(z|x)``
      (``kl_report(vae, x)`` says which for each site). Not written without ``data``;
    - the image ``samples``: ``n_images`` prior draws decoded to the likelihood's means (``vae.sample(n_images)``),
      values clipped to [0, 1], laid out by ``torchvision.utils.make_grid`` ``ceil(sqrt(n_images))`` to a row
      with a white 1-pixel frame (a grey image is drawn with its one channel in red, green and blue). Written
      when ``images`` is on.

    The KL and the samples are computed in eval mode without gradients, from torch random streams seeded with
    ``seed`` and restored afterwards: the training's random numbers (and so a seeded ``fit``'s result) are the
    same with or without this callback, and every epoch's samples decode the same prior draws (for a prior
    without learned parameters), so the grids show how the decoder changes.

    **Every** ``every_n_steps`` **optimizer steps**, at global step = the optimizer step (``state.step``, which
    counts on across epochs and a resume), from ``on_step(state)``, right after the step:

    - ``step/grad_norm``: the global 2-norm of that step's gradients, ``sqrt(sum_p ||p.grad||^2)`` over every
      parameter the optimizer steps (computed in float64; ``fit`` zeroes the gradients only at the start of
      the next step). They are the gradients of the step's loss, which is in nats for the whole training set
      of ``N`` points (see ``step/loss``): ``N`` times the gradient of the per-point objective. With
      ``clip_norm`` it is the norm after clipping (at most ``clip_norm``), that of the gradient Adam applied;
      in data-parallel runs, that of the gradient summed over the ranks, which every rank applies;
    - ``step/loss``: the step's loss ``float(state.loss)``: minus the training objective
      ``E_q[log p(x|z)] - beta KL`` estimated on the step's minibatch and scaled to the whole training set,
      ``-(N / batch)`` times the minibatch's sum of per-point estimates, in nats for the ``N`` training points
      (not per data point): ``-loss / N`` is the step's estimate of ``objective/train`` in nats per data
      point. In data-parallel runs, rank 0's estimate from its share of the minibatch;
    - ``step/lr``: ``param_groups[0]["lr"]`` as ``on_step`` reads it (``step/lr/group0``, ... for several
      groups): the rate of that step, unless a callback before this one in ``callbacks`` has changed it.

    Reading the gradient norm and the loss waits for the device, hence only every ``every_n_steps`` steps.

    **When files are written.** Nothing is written before the first epoch ends (so a run that fails before
    its first checkpoint leaves no event file behind: the values of the steps before it are held in memory);
    the writer opens then, in ``log_dir``, and is flushed after every epoch, so the event files on disk hold
    every finished epoch even if the process is killed. ``fit`` has no end-of-training hook: call
    :meth:`close` after ``fit`` returns, or use the callback as a context manager
    (``with TensorBoard(dir) as tb: fit(..., callbacks=[tb])``); an unclosed callback closes its writer when
    it is garbage collected. In data-parallel runs only rank 0 computes and writes.

    **Resumed and repeated runs.** The writer opens with ``purge_step=1``: TensorBoard hides everything that
    earlier writers left in ``log_dir``, and the callback writes the records ``fit`` restored from a
    checkpoint (``resume_from``) again before the new ones. So ``log_dir`` shows exactly the history of the
    latest ``fit``: one unbroken curve of the :data:`TAGS` scalars for a resumed run, and no trace of a run it
    replaced. The other values are not part of a checkpoint: a resumed run shows ``lr``, ``temperature``,
    ``kl/<site>``, the samples and the ``step/...`` scalars from its resume point on. To compare runs, give
    each its own folder and point TensorBoard at their parent.

    Args:
        log_dir: folder for the event files (created when the first epoch ends).
        data: ``(N, *data_shape)`` tensor or :class:`pyro_vae.data.Dataset` whose first ``num_kl_points``
            points the KL is averaged over (e.g. the training data; checked against the VAE when ``fit``
            starts). ``None``: no ``kl/<site>`` scalars.
        num_kl_points: how many of ``data``'s points (the first ones; all of them when it has fewer) the KL is
            averaged over.
        images: write the ``samples`` grid every epoch. ``None`` (default): when the VAE's data are images,
            ``data_shape`` ``(H, W)``, ``(C, H, W)`` with 1 (grey) or 3 (RGB) channels, or a flat ``(D,)`` with
            ``D = s * s`` for an integer ``s >= 2``, drawn as a grey ``s`` x ``s`` image (``(64,)`` as 8x8,
            ``(784,)`` as 28x28).
        n_images: prior draws in the grid.
        every_n_steps: optimizer steps between two writes of the ``step/...`` scalars.
        seed: seed of the random streams the KL and the samples draw from (the training's are not touched).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed (the message names
            ``pip install 'pyro-vae[tensorboard]'``), ``log_dir`` is not a folder path, or another argument
            is out of range or of the wrong type; when ``fit`` starts, ``images=True`` for data that are not
            images.
        DataError: ``data`` is not a tensor or a Dataset; when ``fit`` starts, its points do not fit the VAE
            (shape, finite values, the likelihood's support).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, data: Any = None, num_kl_points: int = 256,
                 images: bool | None = None, n_images: int = 64, every_n_steps: int = 50, seed: int = 0) -> None:
        if not isinstance(log_dir, (str, os.PathLike)) or str(log_dir) == "":
            raise ConfigError(message("log_dir", "a folder path (str or pathlib.Path)",
                                      f"{type(log_dir).__name__} {log_dir!r}", "pass the folder for the event files"))
        path = Path(log_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(message("log_dir", "a folder for TensorBoard's event files", f"a file at {path}",
                                      "pass a folder path"))
        self.num_kl_points = integer("num_kl_points", num_kl_points, 1)
        self.images = None if images is None else boolean("images", images)
        self.n_images = integer("n_images", n_images, 1)
        self.every_n_steps = integer("every_n_steps", every_n_steps, 1)
        self.seed = integer("seed", seed, 0, 2 ** 63 - 1)
        self.data = None
        if data is not None:  # only the points the KL is averaged over are kept
            x = as_tensor_data(data, "TensorBoard data")
            self.data = x[: self.num_kl_points] if x.dim() > 0 else x
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(message("TensorBoard", "the tensorboard package", "it is not installed",
                                      "pip install 'pyro-vae[tensorboard]' (or pip install tensorboard)")) from None
        self.log_dir = path
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._pending: list[dict[str, Any]] = []
        self._pending_steps: list[tuple[int, dict[str, float]]] = []
        self._active = True
        self._kl_x: torch.Tensor | None = None
        self._layout: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.log_dir)!r})"

    def on_fit_start(self, state: TrainState) -> None:
        """Close the writer of an earlier ``fit``; keep the restored records to write with the first epoch;
        check ``data`` against the VAE and the image layout of its data (rank 0)."""
        self.close()
        self._active = _is_rank0()
        self._pending = list(state.history.epochs)
        self._pending_steps = []
        if not self._active:
            return
        vae = state.vae
        if not isinstance(vae, VAE):
            raise ConfigError(message("callbacks", "a TensorBoard callback on a pyro_vae.VAE (it logs the VAE's KL, "
                                      "temperature and samples)", f"fit on a {type(vae).__name__}",
                                      "train the model/guide pair without the TensorBoard callback"))
        self._layout = _image_layout(vae.data_shape)
        if self.images and self._layout is None:
            raise ConfigError(message("images", "a VAE whose data are images: (H, W), (1 or 3, H, W) or a flat "
                                      "square (D,) with D = s * s", f"data_shape {vae.data_shape}",
                                      "pass images=False"))
        if self.images is False:
            self._layout = None
        self._kl_x = None
        if self.data is not None:
            x = vae.as_data(self.data, "TensorBoard data", data_set=True)
            vae.check_data(x, "TensorBoard data", data_set=True)
            self._kl_x = x.to(vae.device)

    def on_step(self, state: TrainState) -> None:
        """Every ``every_n_steps`` steps: the step's gradient norm, loss and learning rate (held in memory
        until the first epoch ends)."""
        if not self._active or state.step % self.every_n_steps != 0:
            return
        values = {"step/grad_norm": _grad_norm(state.optimizer), "step/loss": float(state.loss),
                  **{f"step/{tag}": lr for tag, lr in _learning_rates(state.optimizer).items()}}
        if self._writer is None:
            self._pending_steps.append((state.step, values))
        else:
            self._add_scalars(values, state.step)

    def on_epoch_end(self, state: TrainState) -> None:
        """Write the epoch's record (and, with the first one, the restored records and the steps so far), the
        learning rate, the temperature, the KL and the samples, and flush."""
        if not self._active:
            return
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=1)
            records, self._pending = [*self._pending, state.history.epochs[-1]], []
            steps, self._pending_steps = self._pending_steps, []
        else:
            records, steps = [state.history.epochs[-1]], []
        for record in records:
            for key, tag in TAGS.items():
                if record.get(key) is not None:
                    self._writer.add_scalar(tag, float(record[key]), global_step=int(record["epoch"]))
        for step, values in steps:
            self._add_scalars(values, step)
        epoch = int(state.history.epochs[-1]["epoch"])
        vae = cast(VAE, state.vae)  # on_fit_start refused a model/guide pair
        self._add_scalars(self._epoch_values(vae, state.optimizer), epoch)
        if self._layout is not None:
            self._writer.add_image("samples", self._sample_grid(vae, self._layout), global_step=epoch)
        self._writer.flush()

    def _epoch_values(self, vae: VAE, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        values = _learning_rates(optimizer)
        if getattr(vae, "relaxed", False):
            encoder: Any = vae.encoder  # a RelaxedCategoricalEncoder or a relaxed BernoulliEncoder
            values["temperature"] = float(encoder.temperature)
        if self._kl_x is not None:
            with _evaluating(vae), _own_rng(vae.device, self.seed):
                report = kl_report(vae, self._kl_x)
            values.update({f"kl/{site.site}": site.kl for site in report.sites})
        return values

    def _sample_grid(self, vae: VAE, layout: tuple[int, int, int]) -> torch.Tensor:
        """The ``samples`` image ``(3 or C, rows, columns)`` in [0, 1]."""
        from torchvision.utils import make_grid

        with _evaluating(vae), _own_rng(vae.device, self.seed):
            x = vae.sample(self.n_images)
        x = x.detach().to("cpu", torch.float32).reshape(self.n_images, *layout).clamp(0.0, 1.0)
        return make_grid(x, nrow=math.ceil(math.sqrt(self.n_images)), padding=1, pad_value=1.0)

    def _add_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write what is buffered to the event file (done after every epoch already)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; a later ``fit`` with this callback opens a new one."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the writer's modules may be gone already
            pass
