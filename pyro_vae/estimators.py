"""Moved to :mod:`pyro_vae.infer.estimators` (``make_estimator_elbo`` to :mod:`pyro_vae.infer.elbo`); this name
stays importable for one release."""

from typing import Any

import pyro_vae.infer.estimators as _module
from pyro_vae.errors import warn_deprecated
from pyro_vae.infer.elbo import make_estimator_elbo

warn_deprecated("pyro_vae.estimators moved to pyro_vae.infer.estimators; import it from there")
__all__ = [*_module.__all__, "make_estimator_elbo"]


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
