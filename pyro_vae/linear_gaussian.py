"""Moved to :mod:`pyro_vae.models.linear_gaussian`; this name stays importable for one release."""

import sys

import pyro_vae.models.linear_gaussian as _module
from pyro_vae.errors import warn_deprecated

warn_deprecated("pyro_vae.linear_gaussian moved to pyro_vae.models.linear_gaussian; import it from there")
sys.modules[__name__] = _module
