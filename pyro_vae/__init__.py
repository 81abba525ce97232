"""pyro-vae: variational autoencoders as plain Pyro model/guide pairs."""

__version__ = "0.1.0"

# Modules (importing ``kl`` registers its closed-form KL divergences with torch).
from . import (  # noqa: E402
    checkpoint, conditional, data, distributed, distributions, encoders, errors, estimators, evaluation, generation,
    imputation, kl, likelihoods, linear_gaussian, networks, priors, relaxed, schedules, validation, variance,
)
from .checkpoint import load, save  # noqa: E402
from .conditional import CVAE, SSVAE  # noqa: E402
from .distributions import StableContinuousBernoulli  # noqa: E402
from .encoders import Encoder, GaussianEncoder, RelaxedCategoricalEncoder  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError, ConfigError, DataError, ModelError, NonFiniteLossError, PyroVAEError, ShapeError,
    TrainingInterrupted,
)
from .estimators import ESTIMATORS, ScoreFunction, make_estimator_elbo, score_function  # noqa: E402
from .evaluation import active_units, amortization_gap, log_likelihood, pareto_k, to_inference_data  # noqa: E402
from .imputation import impute  # noqa: E402
from .kl import KLReport, kl_report  # noqa: E402
from .likelihoods import Bernoulli, ContinuousBernoulli, Normal, NormalLearnedScale  # noqa: E402
from .priors import (  # noqa: E402
    FlowPrior, Laplace, MixtureOfGaussians, RelaxedCategoricalPrior, StandardNormal, StudentT, VampPrior,
)
from .relaxed import ExpOneHotCategorical, ExpRelaxedOneHotCategorical  # noqa: E402
from .schedules import ConstantBeta, ConstantTemperature, ExponentialTemperature, KLWarmup  # noqa: E402
from .train import EarlyStopping, History, evaluate_elbo, fit, make_elbo  # noqa: E402
from .vae import VAE  # noqa: E402
from .variance import exact_gradient, gradient_samples, gradient_statistics  # noqa: E402


def __getattr__(name: str):
    # matplotlib is imported only when pictures are drawn: ``pyro_vae.plots`` loads on first use.
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VAE", "fit", "EarlyStopping", "evaluate_elbo", "make_elbo", "History", "load", "save",
    "Encoder", "GaussianEncoder", "StandardNormal",
    "Bernoulli", "ContinuousBernoulli", "Normal", "NormalLearnedScale",
    "PyroVAEError", "ConfigError", "DataError", "ShapeError", "ModelError", "CheckpointError", "NonFiniteLossError",
    "data", "encoders", "errors", "likelihoods", "networks", "plots", "priors",
    "evaluation", "generation", "imputation", "log_likelihood", "active_units", "pareto_k", "to_inference_data",
    "amortization_gap", "impute",
    "kl", "relaxed", "schedules", "kl_report", "KLReport", "RelaxedCategoricalEncoder",
    "ExpRelaxedOneHotCategorical", "ExpOneHotCategorical", "StableContinuousBernoulli", "distributions",
    "MixtureOfGaussians", "VampPrior", "FlowPrior", "Laplace", "StudentT",
    "RelaxedCategoricalPrior", "ConstantTemperature", "ExponentialTemperature", "ConstantBeta", "KLWarmup",
    "estimators", "variance", "ESTIMATORS", "ScoreFunction", "score_function", "make_estimator_elbo",
    "gradient_samples", "gradient_statistics", "exact_gradient",
    "conditional", "SSVAE", "CVAE", "linear_gaussian",
    "checkpoint", "distributed", "TrainingInterrupted", "validation",
]
