"""The relaxed one-hot categorical (Concrete / Gumbel-softmax) distribution, scored in log space.

Pyro's ``RelaxedOneHotCategorical`` is ``exp`` of an ``ExpRelaxedCategorical`` draw; its ``log_prob``
takes ``log`` of the simplex point again. At low temperature the draw's small entries underflow to 0, the
``log`` gives ``-inf`` and the loss and gradients turn NaN; a straight-through draw is exactly one-hot, so a
prior scores it at ``-inf`` (pyro-ppl/pyro #3304). :class:`StableRelaxedOneHotCategorical` keeps the
log-space draw on the sample it returns and scores that, so the density is computed from finite numbers at
any temperature.

References:
    Maddison, Mnih, Teh (2017), The Concrete Distribution. Jang, Gu, Poole (2017), Categorical
    Reparameterization with Gumbel-Softmax.
"""

from __future__ import annotations

from typing import Optional, Union

import pyro.distributions as dist
import torch
import torch.nn.functional as F

__all__ = ["StableRelaxedOneHotCategorical", "check_temperature"]

_LOG_ATTR = "_relaxed_log_value"


def check_temperature(value: Union[float, torch.Tensor], what: str = "temperature") -> float:
    """``value`` as a float, or :class:`~pyro_vae.errors.ConfigError` unless it is finite and > 0."""
    import math

    from .errors import ConfigError, message

    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ConfigError(message(what, "a finite number > 0", repr(value), f"pass e.g. {what}=1.0")) from None
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(message(what, "a finite number > 0", repr(value),
                                  f"pass e.g. {what}=1.0 (Jang et al. anneal from 1.0 down to 0.5)"))
    return t


class StableRelaxedOneHotCategorical(dist.RelaxedOneHotCategorical):
    """Pyro's ``RelaxedOneHotCategorical`` with a log-space ``log_prob`` and an optional straight-through
    sample.

    ``rsample`` draws ``x ~ ExpRelaxedCategorical(temperature, logits)`` (a point of the log-simplex,
    ``log_softmax((logits + Gumbel) / temperature)``) and returns ``exp(x)`` carrying ``x`` as an attribute.
    ``log_prob(y)`` scores that ``x`` when present (so model and guide score the guide's draw exactly,
    whatever the temperature) and ``log(y)`` otherwise, zeros raised to the smallest positive float (a hard one-hot gets a
    finite score; elsewhere it equals Pyro's).
    With ``straight_through=True`` the sample is the one-hot of the arg-max in the forward pass, with the
    gradient of the relaxed sample in the backward pass, as in Pyro's
    ``RelaxedOneHotCategoricalStraightThrough``; its ``log_prob`` scores the relaxed sample.

    Args:
        temperature: scalar tensor > 0.
        logits: ``(..., K)`` unnormalized log-probabilities (or ``probs``).
        straight_through: return hard one-hot samples with relaxed gradients.

    ``mean`` returns the class probabilities: the mean of the categorical it relaxes, which the
    relaxed distribution's mean tends to as the temperature goes to 0.
    """

    def __init__(self, temperature: torch.Tensor, probs: Optional[torch.Tensor] = None,
                 logits: Optional[torch.Tensor] = None, straight_through: bool = False,
                 validate_args: Optional[bool] = None) -> None:
        super().__init__(temperature, probs=probs, logits=logits, validate_args=validate_args)
        self.straight_through = bool(straight_through)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StableRelaxedOneHotCategorical, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.straight_through = self.straight_through
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        x = self.base_dist.rsample(sample_shape)
        soft = x.exp()
        if self.straight_through:
            hard = F.one_hot(x.argmax(-1), x.shape[-1]).to(soft.dtype)
            y = hard + (soft - soft.detach())
        else:
            y = soft
        setattr(y, _LOG_ATTR, x)
        return y

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        x = getattr(value, _LOG_ATTR, None)
        if x is None:
            if self._validate_args:
                self._validate_sample(value)
            x = value.clamp(min=torch.finfo(value.dtype).tiny).log()
        # Concrete density on the simplex: the ExpRelaxedCategorical density of x = log y, minus
        # log|dy/dx| = sum(x) of y = exp(x) (as torch's TransformedDistribution computes it).
        return self.base_dist.log_prob(x) - x.sum(-1)
