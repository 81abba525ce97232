"""Moved to :mod:`pyro_vae.train.distributed`; this name stays importable for one release."""

import sys

import pyro_vae.train.distributed as _module
from pyro_vae.errors import warn_deprecated

warn_deprecated("pyro_vae.distributed moved to pyro_vae.train.distributed; import it from there")
sys.modules[__name__] = _module
