"""pyro-vae: variational autoencoders as plain Pyro model/guide pairs.

The layout follows Pyro's own: :mod:`pyro_vae.models` (the model/guide pairs), :mod:`pyro_vae.distributions`
(distributions and closed-form KLs this package adds), :mod:`pyro_vae.infer` (the ELBO, gradient estimators and
their variances), :mod:`pyro_vae.train` (``fit`` and its step); the parts (``priors``, ``likelihoods``,
``encoders``, ``networks``), ``data``, run folders (``checkpoint``), ``evaluation``, ``generation``,
``imputation``, ``plots`` and the command line (``cli``) sit beside them.
"""

import importlib

from pyro_vae import (
    checkpoint,
    data,
    distributions,
    encoders,
    errors,
    evaluation,
    generation,
    imputation,
    infer,
    likelihoods,
    models,
    networks,
    priors,
    schedules,
    train,
    validation,
)
from pyro_vae.checkpoint import load, save
from pyro_vae.distributions import ExpOneHotCategorical, ExpRelaxedOneHotCategorical, StableContinuousBernoulli
from pyro_vae.encoders import Encoder, GaussianEncoder, RelaxedCategoricalEncoder
from pyro_vae.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    NonFiniteLossError,
    PyroVAEError,
    ShapeError,
    TrainingInterrupted,
)
from pyro_vae.evaluation import active_units, amortization_gap, log_likelihood, pareto_k, to_inference_data
from pyro_vae.imputation import impute
from pyro_vae.infer import (
    ESTIMATORS,
    KLReport,
    ScoreFunction,
    evaluate_elbo,
    exact_gradient,
    gradient_samples,
    gradient_statistics,
    kl_report,
    make_elbo,
    make_estimator_elbo,
    score_function,
)
from pyro_vae.infer.pair import ModelGuidePair
from pyro_vae.likelihoods import Bernoulli, ContinuousBernoulli, Normal, NormalLearnedScale
from pyro_vae.models import CVAE, SSVAE, VAE
from pyro_vae.priors import (
    FlowPrior,
    Laplace,
    MixtureOfGaussians,
    RelaxedCategoricalPrior,
    StandardNormal,
    StudentT,
    VampPrior,
)
from pyro_vae.schedules import ConstantBeta, ConstantTemperature, ExponentialTemperature, KLWarmup
from pyro_vae.train import EarlyStopping, History, fit
from pyro_vae.version import __version__

# Modules that moved, importable under their old names for one release (each warns once when first imported).
_MOVED = ("vae", "conditional", "linear_gaussian", "relaxed", "kl", "estimators", "variance", "step", "distributed")


def __getattr__(name: str):
    # matplotlib is imported only when pictures are drawn: ``pyro_vae.plots`` loads on first use.
    if name == "plots" or name in _MOVED:
        return importlib.import_module(f"pyro_vae.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "VAE", "CVAE", "SSVAE", "ModelGuidePair", "fit", "EarlyStopping", "evaluate_elbo", "make_elbo", "History",
    "load", "save",
    "Encoder", "GaussianEncoder", "RelaxedCategoricalEncoder", "StandardNormal",
    "Bernoulli", "ContinuousBernoulli", "Normal", "NormalLearnedScale",
    "PyroVAEError", "ConfigError", "DataError", "ShapeError", "ModelError", "CheckpointError", "NonFiniteLossError",
    "TrainingInterrupted",
    "log_likelihood", "active_units", "pareto_k", "to_inference_data", "amortization_gap", "impute",
    "kl_report", "KLReport", "ExpRelaxedOneHotCategorical", "ExpOneHotCategorical", "StableContinuousBernoulli",
    "MixtureOfGaussians", "VampPrior", "FlowPrior", "Laplace", "StudentT", "RelaxedCategoricalPrior",
    "ConstantTemperature", "ExponentialTemperature", "ConstantBeta", "KLWarmup",
    "ESTIMATORS", "ScoreFunction", "score_function", "make_estimator_elbo",
    "gradient_samples", "gradient_statistics", "exact_gradient",
    "models", "distributions", "infer", "train", "checkpoint", "data", "encoders", "errors", "evaluation",
    "generation", "imputation", "likelihoods", "networks", "plots", "priors", "schedules", "validation",
]
