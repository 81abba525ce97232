"""TensorBoard logging of :func:`pyro_vae.fit`'s epochs: the :class:`TensorBoard` callback.

TensorBoard is an optional extra (``pip install 'pyro-vae[tensorboard]'``); it is imported when the callback is
built, never by ``import pyro_vae``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pyro_vae.errors import ConfigError, message
from pyro_vae.train.callbacks import TrainState

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


class TensorBoard:
    """A :func:`pyro_vae.fit` callback that writes each epoch's record of the
    :class:`~pyro_vae.train.History` (``state.history.epochs[-1]``) as TensorBoard scalars, at global step =
    the epoch (1, 2, ...):

    - ``elbo/train``: ``train_elbo``, the ELBO (KL weight 1) averaged over the epoch's minibatches, nats per
      data point;
    - ``elbo/val``: ``val_elbo``, the validation ELBO at the epoch's end, nats per data point (only when
      ``fit`` has validation data);
    - ``objective/train``: ``train_objective``, what the steps maximized, ``E_q[log p(x|z)] - beta KL``, nats
      per data point;
    - ``beta``: the KL weight at the end of the epoch;
    - ``time/epoch_seconds``: the epoch's wall-clock time in seconds.

    The values are those of the history itself, not a second evaluation (TensorBoard stores them as float32).
    View them with ``tensorboard --logdir LOG_DIR``.

    **When files are written.** Nothing is written before the first epoch ends (so a run that fails before
    its first checkpoint leaves no event file behind); the writer opens then, in ``log_dir``, and is flushed
    after every epoch, so the event files on disk hold every finished epoch even if the process is killed.
    ``fit`` has no end-of-training hook: call :meth:`close` after ``fit`` returns, or use the callback as a
    context manager (``with TensorBoard(dir) as tb: fit(..., callbacks=[tb])``); an unclosed callback closes
    its writer when it is garbage collected. In data-parallel runs only rank 0 writes.

    **Resumed and repeated runs.** The writer opens with ``purge_step=1``: TensorBoard hides the scalars that
    earlier writers left in ``log_dir``, and the callback writes the records ``fit`` restored from a
    checkpoint (``resume_from``) again before the new ones. So ``log_dir`` shows exactly the history of the
    latest ``fit``: one unbroken curve for a resumed run, and no trace of a run it replaced. To compare runs,
    give each its own folder and point TensorBoard at their parent.

    Args:
        log_dir: folder for the event files (created when the first epoch ends).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed (the message names
            ``pip install 'pyro-vae[tensorboard]'``), or ``log_dir`` is not a folder path.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not isinstance(log_dir, (str, os.PathLike)) or str(log_dir) == "":
            raise ConfigError(message("log_dir", "a folder path (str or pathlib.Path)",
                                      f"{type(log_dir).__name__} {log_dir!r}", "pass the folder for the event files"))
        path = Path(log_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(message("log_dir", "a folder for TensorBoard's event files", f"a file at {path}",
                                      "pass a folder path"))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(message("TensorBoard", "the tensorboard package", "it is not installed",
                                      "pip install 'pyro-vae[tensorboard]' (or pip install tensorboard)")) from None
        self.log_dir = path
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._pending: list[dict[str, Any]] = []
        self._active = True

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.log_dir)!r})"

    def on_fit_start(self, state: TrainState) -> None:
        """Close the writer of an earlier ``fit``; keep the restored records to write with the first epoch."""
        self.close()
        self._active = _is_rank0()
        self._pending = list(state.history.epochs)

    def on_epoch_end(self, state: TrainState) -> None:
        """Write the epoch's record (and, with the first one, the restored records) and flush."""
        if not self._active:
            return
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=1)
            records, self._pending = [*self._pending, state.history.epochs[-1]], []
        else:
            records = [state.history.epochs[-1]]
        for record in records:
            for key, tag in TAGS.items():
                if record.get(key) is not None:
                    self._writer.add_scalar(tag, float(record[key]), global_step=int(record["epoch"]))
        self._writer.flush()

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
