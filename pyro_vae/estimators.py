"""Moved to :mod:`pyro_vae.infer.estimators`; this name stays importable for one release."""

import sys
import warnings

import pyro_vae.infer.estimators as _module

warnings.warn("pyro_vae.estimators moved to pyro_vae.infer.estimators; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
