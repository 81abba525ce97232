"""Distributions this package adds to Pyro's: the numerically stable continuous Bernoulli, the relaxed and
exact one-hot categoricals in log space, the relaxed and exact Bernoulli in logit space, and closed-form KL
divergences (registered on import)."""

import pyro_vae.distributions.kl  # noqa: F401  (registers the closed-form KL divergences)
from pyro_vae.distributions.continuous_bernoulli import (
    StableContinuousBernoulli,
    cb_log_partition,
    cb_mean,
    cb_variance,
)
from pyro_vae.distributions.relaxed import ExpOneHotCategorical, ExpRelaxedOneHotCategorical
from pyro_vae.distributions.relaxed_bernoulli import LogitBernoulli, LogitRelaxedBernoulli

__all__ = ["StableContinuousBernoulli", "cb_log_partition", "cb_mean", "cb_variance", "ExpRelaxedOneHotCategorical",
           "ExpOneHotCategorical", "LogitRelaxedBernoulli", "LogitBernoulli"]
