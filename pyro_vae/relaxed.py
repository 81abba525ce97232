"""Moved to :mod:`pyro_vae.distributions.relaxed`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.distributions.relaxed as _module

warnings.warn("pyro_vae.relaxed moved to pyro_vae.distributions.relaxed; import it from there", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _module
