"""Moved to :mod:`pyro_vae.models.conditional`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.models.conditional as _module

warnings.warn("pyro_vae.conditional moved to pyro_vae.models.conditional; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
