"""Which latent sites get an analytic KL under ``TraceMeanField_ELBO``, and the closed forms it lacks.

``TraceMeanField_ELBO`` computes ``kl_divergence(q, p)`` for each latent site and, when no closed form is
registered, silently falls back to the Monte Carlo estimate ``log q(z) - log p(z)`` at the guide's draw.
:func:`kl_report` runs the same dispatch on one batch and says which site got which, with the value.

The closed forms this package adds to torch's and Pyro's are registered by :mod:`pyro_vae.distributions.kl`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, kl_divergence

import pyro_vae.distributions.kl  # noqa: F401  (registers the closed forms the report looks up)
from pyro_vae.infer.traces import trace_guide_and_model

__all__ = ["KLSite", "KLReport", "kl_report", "describe"]


# ------------------------------------------------------------------------------------------ report
def describe(d: Any) -> str:
    """A short name of a distribution with its wrappers, e.g. ``Independent(Normal)``."""
    name = type(d).__name__
    if name in _WRAPPERS:
        for attr in ("base_dist", "component_distribution"):
            inner = getattr(d, attr, None)
            if inner is not None:
                return f"{name}({describe(inner)})"
    return name


_WRAPPERS = ("Independent", "MixtureSameFamily", "TransformedDistribution", "MaskedDistribution",
             "ExpandedDistribution")


@dataclass
class KLSite:
    """One latent site: ``method`` is ``"analytic"`` or ``"monte carlo"``; ``kl`` is the KL term per data
    point on the batch given (the closed form, or the one-sample estimate ``log q - log p``)."""

    site: str
    guide: str
    prior: str
    method: str
    kl: float

    def to_dict(self) -> dict[str, Any]:
        """The site as a JSON-able dict (``kl`` in nats per data point)."""
        return {"site": self.site, "guide": self.guide, "prior": self.prior, "method": self.method, "kl": self.kl}


@dataclass
class KLReport:
    """What ``TraceMeanField_ELBO`` does with each latent site (see :func:`kl_report`)."""

    sites: list[KLSite] = field(default_factory=list)

    @property
    def analytic(self) -> list[str]:
        """The latent sites whose KL is the closed form (a ``kl_divergence(q, p)`` is registered)."""
        return [s.site for s in self.sites if s.method == "analytic"]

    @property
    def monte_carlo(self) -> list[str]:
        """The latent sites whose KL falls back to the Monte Carlo estimate ``log q(z) - log p(z)``."""
        return [s.site for s in self.sites if s.method == "monte carlo"]

    def __getitem__(self, site: str) -> KLSite:
        for s in self.sites:
            if s.site == site:
                return s
        raise KeyError(site)

    def to_dict(self) -> dict[str, Any]:
        """``{"sites": [...]}``, one :meth:`KLSite.to_dict` per latent site."""
        return {"sites": [s.to_dict() for s in self.sites]}

    def __str__(self) -> str:
        lines = ["KL under TraceMeanField_ELBO:"]
        for s in self.sites:
            how = "analytic KL" if s.method == "analytic" else "Monte Carlo KL (no closed form registered)"
            lines.append(f'  site "{s.site}": q = {s.guide}, p = {s.prior}: {how}, {s.kl:.3f} nats per data point')
        return "\n".join(lines)


def kl_report(vae_or_model: Any, *args: Any, guide: Callable | None = None, **kwargs: Any) -> KLReport:
    """Which latent sites ``TraceMeanField_ELBO`` gives an analytic KL and which fall back to Monte Carlo.

    Runs the guide once, replays the model against it, and for every latent site tries
    ``kl_divergence(q, p)`` exactly as ``TraceMeanField_ELBO`` does (``NotImplementedError`` means Monte
    Carlo). No gradients are recorded.

    Args:
        vae_or_model: a :class:`pyro_vae.VAE` (its ``model`` and ``guide``), or a model callable (then pass
            ``guide=``).
        *args, **kwargs: the model/guide arguments, e.g. a data batch ``x`` of shape ``(batch, *data_shape)``.
        guide: the guide when ``vae_or_model`` is a model.

    Returns:
        :class:`KLReport` with one :class:`KLSite` per latent site; ``str(report)`` is a readable table.
    """
    if guide is None:
        model, guide = vae_or_model.model, vae_or_model.guide
    else:
        model = vae_or_model
    x = args[0] if args else next(iter(kwargs.values()), None)
    n = int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 1
    with torch.no_grad():
        guide_trace, model_trace = trace_guide_and_model(model, guide, *args, **kwargs)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        report = KLReport()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or name not in guide_trace.nodes:
                continue
            q, p = cast(Distribution, guide_trace.nodes[name]["fn"]), cast(Distribution, site["fn"])
            try:
                kl = kl_divergence(q, p).sum()
                method = "analytic"
            except NotImplementedError:
                z = cast(torch.Tensor, guide_trace.nodes[name]["value"])
                kl = (q.log_prob(z) - p.log_prob(z)).sum()
                method = "monte carlo"
            report.sites.append(KLSite(name, describe(q), describe(p), method, float(kl) / n))
    return report
