"""Moved to :mod:`pyro_vae.distributions.relaxed`; this name stays importable for one release."""

import sys

import pyro_vae.distributions.relaxed as _module
from pyro_vae.errors import warn_deprecated

warn_deprecated("pyro_vae.relaxed moved to pyro_vae.distributions.relaxed; import it from there")
sys.modules[__name__] = _module
