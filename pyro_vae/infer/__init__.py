"""Inference: the ELBO factory and the importance-weighted bound, the sync-free ELBO losses, the KL report, the
gradient estimators (pathwise, score function with baselines and control variates, RLOO, measure-valued, STL,
DReG, relaxed and straight-through) and their variances."""

from pyro_vae.infer.elbo import ELBOS, evaluate_elbo, make_elbo, make_estimator_elbo
from pyro_vae.infer.estimators import ESTIMATORS, ScoreFunction, score_function
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.kl import KLReport, kl_report
from pyro_vae.infer.losses import elbo_loss
from pyro_vae.infer.variance import exact_gradient, gradient_samples, gradient_statistics

__all__ = ["ELBOS", "make_elbo", "evaluate_elbo", "elbo_loss", "kl_report", "KLReport", "ESTIMATORS",
           "ScoreFunction", "score_function", "make_estimator_elbo", "gradient_samples", "gradient_statistics",
           "exact_gradient", "ImportanceWeightedELBO"]
