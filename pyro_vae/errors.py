"""Exception types. Every message names the argument or Pyro site, what was expected, what was found,
and the fix, in the style of Pyro's own ``check_site_shape``."""

from __future__ import annotations

__all__ = ["PyroVAEError", "ConfigError", "DataError", "ShapeError", "ModelError", "CheckpointError",
           "NonFiniteLossError", "TrainingInterrupted", "message"]


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
