"""Moved to :mod:`pyro_vae.infer.variance`; this name stays importable for one release."""

import sys

import pyro_vae.infer.variance as _module
from pyro_vae.errors import warn_deprecated

warn_deprecated("pyro_vae.variance moved to pyro_vae.infer.variance; import it from there")
sys.modules[__name__] = _module
