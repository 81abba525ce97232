"""Moved: the KL report to :mod:`pyro_vae.infer.kl`, the closed-form KL registrations to
:mod:`pyro_vae.distributions.kl`; this name stays importable for one release."""


import pyro_vae.distributions.kl  # noqa: F401
from pyro_vae.errors import warn_deprecated
from pyro_vae.infer.kl import KLReport, KLSite, describe, kl_report

warn_deprecated("pyro_vae.kl moved to pyro_vae.infer.kl (report) and pyro_vae.distributions.kl (closed forms)")
__all__ = ["KLSite", "KLReport", "kl_report", "describe"]
