"""Training: :func:`fit` (minibatch SVI with Adam, checkpoints, resume, data-parallel under ``torchrun``), one
step of it (:func:`svi_step`, :class:`CUDAGraphStep`), its callbacks and guards."""

import importlib
from typing import Any

from pyro_vae.errors import warn_deprecated
from pyro_vae.train.callbacks import EarlyStopping, History, TrainState
from pyro_vae.train.cuda_graph import CUDAGraphStep
from pyro_vae.train.loop import SYNC_EVERY, fit
from pyro_vae.train.step import clip_grad_norm_, svi_step
from pyro_vae.train.tensorboard import TensorBoard

__all__ = ["fit", "History", "TrainState", "EarlyStopping", "TensorBoard", "svi_step", "clip_grad_norm_",
           "CUDAGraphStep", "SYNC_EVERY"]

# Names whose home moved, importable from here for one more release (with a DeprecationWarning).
_MOVED = {"ELBOS": "pyro_vae.infer.elbo", "make_elbo": "pyro_vae.infer.elbo", "evaluate_elbo": "pyro_vae.infer.elbo",
          "as_tensor_data": "pyro_vae.data", "resolve_device": "pyro_vae.validation"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warn_deprecated(f"pyro_vae.train.{name} moved to {_MOVED[name]}.{name}; import it from there")
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
