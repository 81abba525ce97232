"""Moved: the models to :mod:`pyro_vae.models.cvae` and :mod:`pyro_vae.models.ssvae`, their parts to
:mod:`pyro_vae.networks`, :mod:`pyro_vae.encoders` and :mod:`pyro_vae.priors`, the training loops to
:mod:`pyro_vae.train.semisupervised`; this name stays importable for one release."""

from pyro_vae.encoders import CategoricalEncoder, ConditionalGaussianEncoder
from pyro_vae.errors import warn_deprecated
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.ssvae import SSVAE, accuracy, split_labelled
from pyro_vae.networks import ConcatMLP
from pyro_vae.priors import ClassConditionalNormal, ConditionalNormalPrior, Unconditional
from pyro_vae.train.semisupervised import fit_classifier, fit_semisupervised

warn_deprecated("pyro_vae.conditional moved to pyro_vae.models.cvae and pyro_vae.models.ssvae (models), "
                "pyro_vae.networks, pyro_vae.encoders and pyro_vae.priors (parts) and pyro_vae.train.semisupervised "
                "(training)")
__all__ = ["ConcatMLP", "ConditionalGaussianEncoder", "CategoricalEncoder", "ClassConditionalNormal",
           "ConditionalNormalPrior", "Unconditional", "SSVAE", "CVAE", "fit_semisupervised", "fit_classifier",
           "split_labelled", "accuracy"]
