"""Moved to :mod:`pyro_vae.models.vae`; this name stays importable for one release."""

import sys

import pyro_vae.models.vae as _module
from pyro_vae.errors import warn_deprecated

warn_deprecated("pyro_vae.vae moved to pyro_vae.models.vae; import it from there")
sys.modules[__name__] = _module
