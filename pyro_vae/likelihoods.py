"""Likelihoods p(x | z): callables mapping the decoder's output ``(..., *data_shape)`` and the model's named context
(``likelihood(out, **context)``; none by default) to a Pyro distribution. The built-ins take any context and
ignore it.

A likelihood may return a distribution over single entries (event shape ``()``) or over a whole data point
(event shape ``data_shape``); :class:`pyro_vae.VAE` reinterprets the trailing data dimensions as one event
and checks the result. The built-ins also say which data they accept (:meth:`Likelihood.check_data`), so a
grey image scored under a Bernoulli likelihood is an error, not a silent mistake.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.distributions.continuous_bernoulli import StableContinuousBernoulli
from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.validation import number, positive

__all__ = [
    "Likelihood",
    "Bernoulli",
    "ContinuousBernoulli",
    "Normal",
    "NormalLearnedScale",
    "LIKELIHOODS",
    "build_likelihood",
]

LikelihoodFn = Callable[[torch.Tensor], dist.TorchDistribution]


class Likelihood(nn.Module):
    """Base class of the built-in likelihoods. ``forward(out)`` returns a distribution whose batch shape
    is ``out.shape``; :meth:`check_data` raises :class:`DataError` for data outside the support."""

    name = "likelihood"
    support_text = "any real values"

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_likelihood` rebuilds this likelihood from (name and settings)."""
        return {"name": self.name}

    def check_data(self, x: torch.Tensor, what: str = "x") -> None:
        """Raise :class:`DataError` when ``x`` has values outside this likelihood's support."""

    def _support_error(self, what: str, found: str, fix: str) -> DataError:
        return DataError(message(f'{what} under the "{self.name}" likelihood', self.support_text, found, fix))


class Bernoulli(Likelihood):
    """Binary data: ``Bernoulli(logits=decoder_output)``."""

    name = "bernoulli"
    support_text = "binary values in {0, 1}"

    def forward(self, out: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=out)

    def check_data(self, x: torch.Tensor, what: str = "x") -> None:
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            example = x[bad].flatten()[0].item()
            raise self._support_error(
                what,
                f"{int(bad.sum())} non-binary values (e.g. {example:.4g})",
                'binarize the data (--binarize static|dynamic) or use the "continuous-bernoulli" likelihood '
                "for grey levels in [0, 1]",
            )


class ContinuousBernoulli(Likelihood):
    """Grey levels in [0, 1]: the continuous Bernoulli with logits ``decoder_output`` (Loaiza-Ganem &
    Cunningham 2019), the properly normalized density for data that a Bernoulli likelihood would mis-score.

    Returns a :class:`~pyro_vae.distributions.StableContinuousBernoulli` of batch shape ``out.shape``:
    ``log p(x) = x * eta - log(expm1(eta) / eta)`` nats per entry, its mean, variance and sampler exact
    for every finite logit ``eta`` (torch's own ``ContinuousBernoulli`` is not normalized beyond
    ``|eta| ~ 16`` in float32)."""

    name = "continuous-bernoulli"
    support_text = "values in [0, 1]"

    def forward(self, out: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        return StableContinuousBernoulli(logits=out)

    def check_data(self, x: torch.Tensor, what: str = "x") -> None:
        bad = (x < 0) | (x > 1)
        if bool(bad.any()):
            raise self._support_error(
                what,
                f"values in [{x.min().item():.4g}, {x.max().item():.4g}]",
                'rescale the data to [0, 1] (e.g. divide 8-bit images by 255) or use the "normal" likelihood '
                "for real-valued data",
            )


class Normal(Likelihood):
    """Real-valued data with a known spherical standard deviation: ``Normal(decoder_output, scale)``."""

    name = "normal"
    support_text = "finite real values"

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        self.scale = positive("likelihood scale", scale, fix="pass e.g. scale=0.1")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}

    def forward(self, out: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        return dist.Normal(out, self.scale)


class NormalLearnedScale(Likelihood):
    """Real-valued data with one learned standard deviation per data entry,
    ``Normal(decoder_output, softplus(rho) + min_scale)``."""

    name = "normal-learned"
    support_text = "finite real values"

    def __init__(self, data_shape: Sequence[int], init_scale: float = 0.1, min_scale: float = 1e-3) -> None:
        super().__init__()
        min_scale = number("min_scale", min_scale, 0.0, strict=False, fix="pass min_scale=1e-3")
        init_scale = number("init_scale", init_scale, min_scale, fix=f"pass init_scale=0.1 (> min_scale={min_scale:g})")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.min_scale = min_scale
        rho = math.log(math.expm1(init_scale - min_scale))
        self.rho = nn.Parameter(torch.full(self.data_shape, rho))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "min_scale": self.min_scale}

    @property
    def scale(self) -> torch.Tensor:
        """The learned standard deviation per data entry, ``softplus(rho) + min_scale``, shape ``data_shape``."""
        return F.softplus(self.rho) + self.min_scale

    def forward(self, out: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        return dist.Normal(out, self.scale)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, ContinuousBernoulli, Normal, NormalLearnedScale)
}


def build_likelihood(spec: str | dict | LikelihoodFn, data_shape: Sequence[int]) -> LikelihoodFn:
    """A likelihood from a name (``"bernoulli"``), a config dict (``{"name": "normal", "scale": 0.2}``),
    or a callable, which is returned as is."""
    if callable(spec):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if spec not in LIKELIHOODS:
        raise ConfigError(
            message(
                "likelihood",
                "one of " + ", ".join(sorted(LIKELIHOODS)) + " or a callable decoder_output -> Distribution",
                repr(spec),
                "pick one of the known names",
            )
        )
    cls = LIKELIHOODS[spec]
    if cls is NormalLearnedScale:
        return cls(data_shape, **kwargs)
    return cls(**kwargs)
