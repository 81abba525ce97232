"""Moved: the KL report to :mod:`pyro_vae.infer.kl_report`, the closed-form KL registrations to
:mod:`pyro_vae.distributions.kl`; this name stays importable for one release."""

import warnings

import pyro_vae.distributions.kl  # noqa: F401
from pyro_vae.infer.kl_report import KLReport, KLSite, describe, kl_report

warnings.warn("pyro_vae.kl moved to pyro_vae.infer.kl_report (report) and pyro_vae.distributions.kl (closed forms)",
              DeprecationWarning, stacklevel=2)
__all__ = ["KLSite", "KLReport", "kl_report", "describe"]
