"""Training: :func:`fit` (minibatch SVI with Adam, checkpoints, resume, data-parallel under ``torchrun``), one
step of it (:func:`svi_step`, :class:`CUDAGraphStep`), its callbacks and guards."""

from pyro_vae.data import as_tensor_data as as_tensor_data
from pyro_vae.infer.elbo import ELBOS as ELBOS
from pyro_vae.infer.elbo import evaluate_elbo as evaluate_elbo
from pyro_vae.infer.elbo import make_elbo as make_elbo
from pyro_vae.train.callbacks import EarlyStopping, History, TrainState
from pyro_vae.train.cuda_graph import CUDAGraphStep
from pyro_vae.train.loop import SYNC_EVERY, fit
from pyro_vae.train.step import clip_grad_norm_, svi_step
from pyro_vae.train.tensorboard import TensorBoard
from pyro_vae.validation import resolve_device as resolve_device

__all__ = ["fit", "History", "TrainState", "EarlyStopping", "TensorBoard", "svi_step", "clip_grad_norm_",
           "CUDAGraphStep", "SYNC_EVERY"]
# Also importable from here for one more release, their homes being pyro_vae.infer, pyro_vae.data and
# pyro_vae.validation: ELBOS, make_elbo, evaluate_elbo, as_tensor_data, resolve_device.
