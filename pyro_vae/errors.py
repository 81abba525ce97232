"""Exception types. Every message names the argument or Pyro site, what was expected, what was found,
and the fix, in the style of Pyro's own ``check_site_shape``."""

from __future__ import annotations

import sys
import warnings
from types import FrameType

__all__ = ["PyroVAEError", "ConfigError", "DataError", "ShapeError", "ModelError", "CheckpointError",
           "NonFiniteLossError", "TrainingInterrupted", "message", "warn_deprecated"]


class PyroVAEError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PyroVAEError, ValueError):
    """An argument (of a constructor, of ``fit`` or of the command line) is out of range or unknown."""


class DataError(PyroVAEError, ValueError):
    """Data that cannot be used as given: empty, non-finite, wrong shape, or outside a likelihood's support."""


class ShapeError(PyroVAEError, ValueError):
    """A network, prior or likelihood produced a tensor or distribution of the wrong shape."""


class ModelError(PyroVAEError, ValueError):
    """A part of the model (encoder, decoder, prior or likelihood) returned something unusable: not a
    distribution, or a distribution with NaN or infinite parameters. The message names the part and the site."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint that does not exist, is not a run, or does not fit this configuration."""


class NonFiniteLossError(PyroVAEError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint; the message says how to
    resume. A ``KeyboardInterrupt``, so code that stops on Ctrl-C keeps doing so."""

    def __init__(self, text: str, checkpoint: str | None = None, epoch: int = 0, step: int = 0) -> None:
        super().__init__(text)
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


def message(what: str, expected: str, found: str, fix: str) -> str:
    """One error line: ``what: expected ..., found .... Fix: ...``."""
    return f"{what}: expected {expected}, found {found}. Fix: {fix}"


def warn_deprecated(text: str) -> None:
    """Issue a ``DeprecationWarning`` attributed to the user's code: the first calling frame outside this package
    and outside Python's import machinery (so an ``import pyro_vae.old_name`` in a script shows the warning under
    Python's default filters, which show a ``DeprecationWarning`` only where ``__main__`` triggers it)."""
    frame: FrameType | None = sys._getframe(1)  # the caller: stacklevel 2
    level = 2
    while frame is not None:
        # the frames Python's stacklevel skips itself (as CPython's warnings._is_internal_frame does)
        internal = "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename
        if not internal and frame.f_globals.get("__name__", "").split(".")[0] not in ("pyro_vae", "importlib"):
            break
        frame = frame.f_back
        if not internal:  # Python's stacklevel skips the import machinery's frames itself
            level += 1
    warnings.warn(text, DeprecationWarning, stacklevel=level)
