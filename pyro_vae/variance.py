"""Moved to :mod:`pyro_vae.infer.variance`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.infer.variance as _module

warnings.warn("pyro_vae.variance moved to pyro_vae.infer.variance; import it from there", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _module
