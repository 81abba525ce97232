"""Moved to :mod:`pyro_vae.train.distributed`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.train.distributed as _module

warnings.warn("pyro_vae.distributed moved to pyro_vae.train.distributed; import it from there", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _module
