"""Moved to :mod:`pyro_vae.models.linear_gaussian`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.models.linear_gaussian as _module

warnings.warn("pyro_vae.linear_gaussian moved to pyro_vae.models.linear_gaussian; import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
