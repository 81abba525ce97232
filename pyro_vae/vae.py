"""Moved to :mod:`pyro_vae.models.vae`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.models.vae as _module

warnings.warn("pyro_vae.vae moved to pyro_vae.models.vae; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
