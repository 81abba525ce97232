"""Moved to :mod:`pyro_vae.train.step`, :mod:`pyro_vae.train.cuda_graph` and :mod:`pyro_vae.infer.losses`; this
name stays importable for one release."""


from pyro_vae.errors import warn_deprecated
from pyro_vae.infer.losses import elbo_loss
from pyro_vae.train.cuda_graph import CUDAGraphStep
from pyro_vae.train.step import clip_grad_norm_, svi_step

warn_deprecated("pyro_vae.step moved to pyro_vae.train (svi_step, clip_grad_norm_, CUDAGraphStep) and "
              "pyro_vae.infer (elbo_loss)")
__all__ = ["svi_step", "elbo_loss", "clip_grad_norm_", "CUDAGraphStep"]
